"""Names AtomAI imports at module load for its segmentation backbones; the rVAE benchmark never
calls them, so they fail loudly if anything does."""


def _unavailable(name):
    def build(*args, **kwargs):
        raise RuntimeError(f"torchvision.models.{name} is not part of the benchmark's torchvision shim")
    build.__name__ = name
    return build


mobilenet_v2 = _unavailable("mobilenet_v2")
resnet50 = _unavailable("resnet50")
vgg16 = _unavailable("vgg16")
