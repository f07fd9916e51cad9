"""`configs/metadata.json` of a model bundle as a pydantic model (docs/model-bundle.md).

Like node/config.py: unknown keys and bad values are errors that name the key, so a bundle
that would fail when a worker builds its pipeline fails when its metadata is read (the
listener, `pacsnode models` and `pacsnode run` read it before anything starts). No torch here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from pipelines.base import DEMO_DISCLAIMER

__all__ = [
    "ARCHITECTURES",
    "DETECTOR_ARCHITECTURE",
    "BundleMetadata",
    "DetectorSpec",
    "InputSize",
    "NetworkSpec",
    "Networks",
    "Preprocessing",
    "Source",
    "describe_errors",
]

# pipelines/networks.py builds these; the names live here so reading metadata needs no torch
ARCHITECTURES = ("UNet", "DenseNet121", "ResNet50", "VGG16", "SmallCNN")
DETECTOR_ARCHITECTURE = "RetinaNet"  # pipelines/detector.py builds it

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the file")]
Probability = Annotated[float, Field(ge=0, le=1)]
Size = Annotated[int, Field(ge=32, description="square input size in pixels")]
Text = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSpec(_Strict):
    """A network the node builds from the registry (pipelines/networks.py), never code from a file."""

    architecture: Literal["UNet", "DenseNet121", "ResNet50", "VGG16", "SmallCNN"]
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the architecture")
    weights: Text = Field(description="state dict file, relative to the bundle")
    sha256: Sha256
    gradcam_layer: str | None = Field(None, description="classifier: Grad-CAM target module (None: the default)")


class DetectorSpec(_Strict):
    """The optional lung-opacity RetinaNet (pipelines/detector.py)."""

    architecture: Literal["RetinaNet"]
    args: dict[str, Any]
    detection: dict[str, Any] | None = None
    score_threshold: Probability
    input_size: Size
    weights: Text
    sha256: Sha256


class Networks(_Strict):
    segmentation: NetworkSpec
    classifier: NetworkSpec
    detector: DetectorSpec | None = None


class InputSize(_Strict):
    segmentation: Size
    classifier: Size


class Preprocessing(_Strict):
    """Lung mask post-processing and what the classifier sees.

    crop: `lung` (the lung box), `none` (the whole image) or `center` (the centred square,
    torchxrayvision's XRayCenterCrop). scaling: `equalise` (pacsnode's recipe: resize, then
    histogram equalisation of the display image) or `torchxrayvision` (pipelines/xrv.py:
    [-1024, 1024], skimage resize). pixels: what torchxrayvision scaling starts from, `stored`
    (its DICOM reader: stored values / (2^BitsStored - 1)) or `display` (the node's rendering).
    """

    mask_threshold: Probability
    opening_radius: int = Field(ge=0, description="binary opening radius, pixels at the segmentation size")
    crop_margin: float = Field(ge=0, le=1, description="lung box margin, fraction of the box")
    crop: Literal["lung", "none", "center"] = "lung"
    scaling: Literal["equalise", "torchxrayvision"] = "equalise"
    pixels: Literal["display", "stored"] = "display"

    @model_validator(mode="after")
    def _consistent(self) -> Preprocessing:
        xrv = self.scaling == "torchxrayvision"
        if xrv != (self.crop == "center"):
            raise ValueError("crop 'center' goes with scaling 'torchxrayvision' and only with it "
                             f"(torchxrayvision defines its centre crop), not crop {self.crop!r} "
                             f"with scaling {self.scaling!r}")  # fmt: skip
        if self.pixels == "stored" and not xrv:
            raise ValueError("pixels 'stored' is torchxrayvision's reader; the equalised recipe uses display pixels")
        return self


class Source(_Strict):
    """Provenance of third-party weights (`python -m training import-xrv`)."""

    third_party: Literal[True]
    library: Text = Field(description="e.g. torchxrayvision")
    library_version: Text = Field(description="the release whose definitions (labels, thresholds, preprocessing) were used")
    model: Text = Field(description="the library's name for the weights, e.g. densenet121-res224-all")
    weights_file: Text = Field(description="the published file's name")
    weights_sha256: Sha256 = Field(description="sha256 of the published file as imported")
    weights_url: Text = Field(description="where the library downloads it from")
    trained_on: list[Text] = Field(min_length=1, description="data sets the weights were trained on")
    license: Text
    citation: Text
    dropped_outputs: list[str] = Field(default_factory=list,
                                       description="outputs the library leaves untrained (no label or no threshold)")


class BundleMetadata(_Strict):
    """configs/metadata.json: MONAI bundle fields plus pacsnode's (docs/model-bundle.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_id: str | None = Field(None, alias="schema", description="format tag written by export")
    version: Text
    changelog: dict[str, str]
    monai_version: Text
    pytorch_version: Text
    name: Text
    authors: Text
    manufacturer: Text
    description: str
    intended_use: Text
    network_data_format: dict[str, Any]
    labels: list[Text] = Field(min_length=1)
    thresholds: dict[str, Probability]
    input_size: InputSize
    preprocessing: Preprocessing
    networks: Networks
    device_uid: str = Field(pattern=r"^2\.25\.(0|[1-9][0-9]*)$", max_length=64)
    demo: StrictBool
    training_data: dict[str, Any]
    metrics: dict[str, Any]
    source: Source | None = Field(None, description="third-party weights: where they came from")

    @model_validator(mode="after")
    def _consistent(self) -> BundleMetadata:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique: {self.labels}")
        if set(self.thresholds) != set(self.labels):
            raise ValueError("thresholds must have exactly one entry per label "
                             f"(missing {sorted(set(self.labels) - set(self.thresholds))}, "
                             f"extra {sorted(set(self.thresholds) - set(self.labels))})")  # fmt: skip
        if self.demo and DEMO_DISCLAIMER not in self.description:
            raise ValueError("a demo bundle's description must contain the disclaimer")
        if self.demo and self.source is not None:
            raise ValueError("third-party weights (source) cannot be demo weights")
        return self

    def threshold_list(self) -> tuple[float, ...]:
        """Thresholds in label order."""
        return tuple(float(self.thresholds[k]) for k in self.labels)


def describe_errors(e: ValidationError) -> str:
    """One line per problem, each naming its key: `preprocessing.mask_threshold: Field required`."""
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)
