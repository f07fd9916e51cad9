"""torchxrayvision's own side of the parity tests; runs in the torchxrayvision environment only.

    .venv-xrv/bin/python tests/xrv_reference.py OUT --dicom A.dcm ... --image B.jpeg ...

Imports torchxrayvision (and torchvision), never pacsnode, and downloads nothing: networks are
built with `weights=None`, given seeded non-trivial parameters and batch-norm statistics, and
saved in the formats torchxrayvision publishes:

    DenseNet121   the whole pickled torchxrayvision.models.DenseNet (torch.save(model)): the
                  all-data model in torch's legacy format (as the 2020 releases), the NIH model
                  in the zip format
    ResNet50      the state dict of torchvision's resnet50 with xrv's one-channel conv1, as
                  xrv.models.ResNet loads it (its constructor insists on downloading, so the
                  network is built the way it builds it)

OUT/reference.npz holds, for each model, its inputs and torchxrayvision's outputs on them
(logits, sigmoid probabilities, op_norm outputs with the published op_threshs) and, for each
image, torchxrayvision's preprocessing of it (read_xray_dcm or normalize(img, 255), then
XRayCenterCrop and XRayResizer at 224 and 512). OUT/reference.json lists what is where.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import skimage.io
import torch
import torchvision
import torchxrayvision as xrv

DENSENET_FILES = {  # (torchxrayvision weights name, legacy format?)
    "densenet121-res224-all": True,
    "densenet121-res224-nih": False,
}
RESNET = "resnet50-res512-all"


def _randomise(net: torch.nn.Module, seed: int) -> None:
    """Seeded, non-trivial parameters and batch-norm statistics, so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(0.05 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))


def _calibrate(net: torch.nn.Module, head: torch.nn.Linear, x: torch.Tensor, seed: int,
               op_threshs: list[float]) -> None:
    """Set the output layer so that, on `x`, each output's logits spread by about 2 around the
    logit of its operating threshold: probabilities neither saturate nor sit at one value, and
    the images fall on both sides of every threshold (the decisions are worth comparing)."""
    with torch.no_grad():
        head.weight.fill_(0)
        head.bias.fill_(0)
        feats = []
        hook = head.register_forward_hook(lambda m, i, o: feats.append(i[0]))
        net(x)
        hook.remove()
        f = feats[0] - feats[0].mean(dim=0)
        g = torch.Generator().manual_seed(100 + seed)
        w = torch.randn(head.weight.shape, generator=g)
        spread = (f @ w.T).std(dim=0).clamp_min(1e-6)
        head.weight.copy_(2 * w / spread[:, None])
        t = torch.tensor([0.5 if np.isnan(v) else v for v in op_threshs], dtype=torch.float32)
        head.bias.copy_(-(feats[0].mean(dim=0) @ head.weight.T) + torch.logit(t))


def _preprocess(img: np.ndarray, size: int) -> np.ndarray:
    """torchxrayvision's transforms, as its docs chain them: centre crop, then resize."""
    img = xrv.datasets.XRayCenterCrop()(img)
    return xrv.datasets.XRayResizer(size)(img)


def _outputs(model: torch.nn.Module, x: torch.Tensor, op_threshs: list[float]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        model.op_threshs = None
        model.apply_sigmoid = False
        logits = model(x)
        model.apply_sigmoid = True
        probs = model(x)
        model.op_threshs = torch.tensor(op_threshs)  # as xrv sets them after loading published weights
        normed = model(x)
    return {"logits": logits.numpy(), "probs": probs.numpy(), "op_norm": normed.numpy()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--dicom", type=Path, action="append", default=[])
    p.add_argument("--image", type=Path, action="append", default=[], help="8-bit JPEG/PNG")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    index: dict[str, object] = {"torchxrayvision": xrv.__version__, "torch": torch.__version__,
                                "torchvision": torchvision.__version__, "images": [], "models": {}}

    # torchxrayvision's preprocessing of every image (its reader, its transforms)
    for i, path in enumerate(args.dicom + args.image):
        if path.suffix.lower() == ".dcm":
            img = xrv.utils.read_xray_dcm(path)[None]  # (1, H, W) in [-1024, 1024]
        else:
            img = xrv.utils.normalize(skimage.io.imread(path), 255, reshape=True)
        for size in (224, 512):
            arrays[f"image{i}_{size}"] = _preprocess(img, size)
        index["images"].append({"path": str(path), "key": f"image{i}", "shape": list(img.shape[1:])})  # type: ignore[union-attr]
    x224 = torch.from_numpy(np.stack([arrays[f"image{i}_224"] for i in range(len(index["images"]))]))  # type: ignore[arg-type]
    x512 = torch.from_numpy(np.stack([arrays[f"image{i}_512"] for i in range(len(index["images"]))]))  # type: ignore[arg-type]

    for seed, (name, legacy) in enumerate(DENSENET_FILES.items()):
        urls = xrv.models.model_urls[name]
        model = xrv.models.DenseNet(weights=None).eval()
        _randomise(model, seed)
        _calibrate(model, model.classifier, x224, seed, urls["op_threshs"])
        file = args.out / Path(urls["weights_url"]).name
        torch.save(model, file, _use_new_zipfile_serialization=not legacy)
        for k, v in _outputs(model, x224, urls["op_threshs"]).items():
            arrays[f"{name}_{k}"] = v
        index["models"][name] = {"file": file.name, "format": "legacy" if legacy else "zip", "input": "224"}  # type: ignore[index]

    urls = xrv.models.model_urls[RESNET]
    # what xrv.models.ResNet.__init__ builds for resnet50 weights, and the file it loads
    net = torchvision.models.resnet50(num_classes=len(urls["labels"]), weights=None)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    _randomise(net, 7)
    _calibrate(net.eval(), net.fc, x512, 7, urls["op_threshs"])
    file = args.out / Path(urls["weights_url"]).name
    torch.save(net.state_dict(), file)
    resnet = xrv.models.ResNet.__new__(xrv.models.ResNet)  # its __init__ downloads; same attributes set here
    torch.nn.Module.__init__(resnet)
    resnet.weights, resnet.model, resnet.apply_sigmoid = RESNET, net.eval(), False
    resnet.input_resolution = urls["input_resolution"]
    for k, v in _outputs(resnet, x512, urls["op_threshs"]).items():
        arrays[f"{RESNET}_{k}"] = v
    index["models"][RESNET] = {"file": file.name, "format": "state dict", "input": "512"}  # type: ignore[index]

    np.savez(args.out / "reference.npz", **arrays)
    (args.out / "reference.json").write_text(json.dumps(index, indent=2))


if __name__ == "__main__":
    main()
