"""Rotationally invariant VAE (rVAE) for particle windows.

Modules: :mod:`.networks` (encoders and coordinate decoders), :mod:`.losses` (KL terms and
likelihoods), :mod:`.model` (:class:`RVAE`), :mod:`.trainer` (the training loop, for any model
with the documented methods), :mod:`.checkpoint` (reading and checking checkpoints, the resume
fingerprint), :mod:`.data` (windows from arrays or Zarr), :mod:`.baselines` (plain VAE,
Gaussian mixture), :mod:`.semisupervised` (class latents: ssrvae, jrvae, class-conditional, ssvae), :mod:`.conditional`
(the angle-conditional rVAE), :mod:`.rvae3d`
(out-of-plane orientation: a 3D rotation latent) with :mod:`.so3` (quaternions, SO(3) grid).
"""

from .model import RVAE, wrap_angle

__all__ = ["RVAE", "build_model", "load_model", "wrap_angle"]


def build_model(settings: dict, window_size):
    """The model the ``rvae.model`` setting selects: RVAE, a class model, the plain VAE or the Gaussian mixture."""
    from .semisupervised import CLASS_MODELS, ClassRVAE

    kind = settings.get("model", "rvae")
    if kind == "rvae3d":
        from .rvae3d import RVAE3D

        return RVAE3D.from_settings(settings, window_size)
    if kind in CLASS_MODELS:
        return ClassRVAE.from_settings(settings, window_size)
    if kind == "gmm":
        from .baselines import WindowGMM

        return WindowGMM.from_settings(settings, window_size)
    if kind == "vae":
        from .baselines import PlainVAE

        return PlainVAE.from_settings(settings, window_size)
    if settings.get("condition") == "angle":
        from .conditional import AngleConditionedRVAE

        return AngleConditionedRVAE.from_settings(settings, window_size)
    return RVAE.from_settings(settings, window_size)


def load_model(path, **expect):
    """Load any model that :func:`build_model` can make (dispatches on the checkpoint's kind)."""
    from .baselines import PlainVAE, WindowGMM
    from .checkpoint import read_checkpoint
    from .semisupervised import CLASS_MODELS, ClassRVAE

    payload = read_checkpoint(path)
    kind = payload["kind"]
    if kind == "rvae3d":
        from .rvae3d import RVAE3D

        return RVAE3D.load(path, **expect)
    if kind == "gmm":
        return WindowGMM.load(path, **expect)
    if kind == "vae":
        return PlainVAE.load(path, **expect)
    if kind in CLASS_MODELS:
        return ClassRVAE.load(path, **expect)
    if payload["config"].get("condition") == "angle":
        from .conditional import AngleConditionedRVAE

        return AngleConditionedRVAE.load(path, **expect)
    return RVAE.load(path, **expect)
