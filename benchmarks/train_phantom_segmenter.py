"""A small tissue segmenter trained on phantom MR *and* CT: modality-robust features for `latent register --method feature`.

    python benchmarks/train_phantom_segmenter.py --out phantom_segmenter [--seconds 300] [--cases 12]
    latent register --data ROOT --out ROOT2 --method feature --feature-network phantom_segmenter

IMPACT-style registration compares the features of a frozen network that has learnt anatomy from
both modalities (a segmentation network trained on CT and MR). No such weights can be downloaded
here, so this script trains a stand-in: a MONAI ``DynUNet`` that labels the phantom's tissues from
either image, each normalised exactly as ``latent register --method feature --feature-network``
feeds it (the CT through the folder's HU window, the MR through the project's MR normalisation read
as that window). Training cases use ``--seed`` (default 1), never the benchmarks' seed 0; the
held-out Dice per modality (seed ``--seed + 1``) says whether the network sees both.

Writes a weights folder ``--out`` (``config.json`` + ``model.safetensors``, the format of
``latent.core.segmentation_network``; generated, never committed) and the record
``benchmarks/results/<name>.{json,md}`` with the machine, its load and the git revision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
#: The network (MONAI DynUNet): four levels, first in-plane only (the phantom's slices are thick).
KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 6, "kernel_size": [[3, 3, 3]] * 4,
          "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], "upsample_kernel_size": [[1, 2, 2], [2, 2, 2], [2, 2, 2]],
          "filters": [8, 16, 32, 64], "norm_name": "instance", "res_block": True}
#: What the network labels: the phantom's tissues grouped by what both images show (background, air,
#: lung, fat, soft tissue, bone); 20 fine labels gave a network too weak to agree across modalities.
GROUPS = {"background": 0, "air": 1, "lung": 2, "fat": 3, "cancellous": 5, "cortical": 5, "teeth": 5, "metal": 5}
#: Default feature layer: the last decoder level, at full resolution, just before the labels.
LAYERS = ["upsamples.2"]
#: Training crop (z, y, x) voxels.
CROP = (16, 64, 64)


def network_inputs(case):
    """The (MR, CT) network inputs of a phantom case, as ``register_feature`` computes them."""
    import numpy as np
    import torch

    from latent.core.intensity import fit_mr_scaling, mr_to_unit
    from latent.core.segmentation_network import IntensityMap

    intensity = IntensityMap()
    mr_unit = mr_to_unit(case.mr, fit_mr_scaling(case.mr, case.mask))
    mr = intensity.from_unit(torch.from_numpy(np.ascontiguousarray(mr_unit, np.float32)))
    ct = intensity.from_hu(torch.from_numpy(np.ascontiguousarray(case.ct, np.float32)))
    return mr, ct


def grouped_labels(labels):
    """The phantom's labels mapped onto :data:`GROUPS` (every other tissue is soft tissue, 4)."""
    import numpy as np

    from latent.core.phantom.anatomy import LABELS

    table = np.array([GROUPS.get(LABELS[i], 4) for i in range(max(LABELS) + 1)], dtype=np.int64)
    return table[labels]


def phantoms(count: int, seed: int) -> list:
    """``count`` clean small phantoms of every region: (MR input, CT input, labels) tensors."""
    import torch

    from latent.core.phantom.generate import case_ids, case_rng, render_case

    cases = []
    for region, pid in case_ids(count, ["AB", "HN", "TH"]):
        case = render_case(pid, region, case_rng(seed, pid), "small")
        mr, ct = network_inputs(case)
        cases.append((mr, ct, torch.from_numpy(grouped_labels(case.labels))))
    return cases


def crop_batch(cases: list, generator) -> tuple:
    """Two random crops of two cases, each as MR and as CT (batch 4): the same labels from either image."""
    import torch
    import torch.nn.functional as F

    images, labels = [], []
    for index in torch.randint(len(cases), (2,), generator=generator).tolist():
        mr, ct, label = cases[index]
        pad = [max(0, c - n) for c, n in zip(CROP, label.shape)]
        spec = [p for size in reversed(pad) for p in (0, size)]
        mr, ct = F.pad(mr, spec, mode="constant", value=float(mr.min())), F.pad(ct, spec, value=0.0)
        label = F.pad(label, spec)
        start = [int(torch.randint(n - c + 1, (1,), generator=generator)) for n, c in zip(label.shape, CROP)]
        window = tuple(slice(s, s + c) for s, c in zip(start, CROP))
        images += [mr[window], ct[window]]
        labels += [label[window], label[window]]
    return torch.stack(images)[:, None], torch.stack(labels)[:, None]


def held_out_dice(network, cases: list) -> dict:
    """Mean Dice over the labels present, per input modality, on whole held-out volumes."""
    import torch
    import torch.nn.functional as F
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    from latent.core.registration.feature import NETWORK_MULTIPLE

    scores = {"mr": [], "ct": []}
    network.eval()
    with torch.no_grad():
        for mr, ct, label in cases:
            padding = [(-n) % NETWORK_MULTIPLE for n in label.shape]
            spec = [p for pad in reversed(padding) for p in (0, pad)]
            truth = one_hot(label[None, None], KWARGS["out_channels"])
            for name, image in (("mr", mr), ("ct", ct)):
                logits = network(F.pad(image[None, None], spec, mode="replicate"))
                logits = logits[:, :, :label.shape[0], :label.shape[1], :label.shape[2]]
                found = one_hot(logits.argmax(1, keepdim=True), KWARGS["out_channels"])
                dice = compute_dice(found, truth, include_background=False, ignore_empty=True)
                scores[name].append(float(torch.nanmean(dice)))
    return {name: round(sum(values) / len(values), 3) for name, values in scores.items()}


def train(out: Path, cases: int, seed: int, seconds: float, threads: int) -> dict:
    """Train until ``seconds`` have passed; write the weights folder; return the record."""
    import torch
    from monai.losses import DiceCELoss
    from safetensors.torch import save_file

    from latent.core.segmentation_network import build_segmentation_network

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    training, held_out = phantoms(cases, seed), phantoms(3, seed + 1)
    network = build_segmentation_network("DynUNet", KWARGS, out / "config.json")
    optimiser = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-5)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    generator = torch.Generator().manual_seed(seed)
    start, steps, losses = time.perf_counter(), 0, []
    network.train()
    while time.perf_counter() - start < seconds:
        images, labels = crop_batch(training, generator)
        optimiser.zero_grad()
        loss = loss_function(network(images), labels)
        loss.backward()
        optimiser.step()
        steps, losses = steps + 1, losses + [loss.item()]
    trained = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in network.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"class_name": "DynUNet", "kwargs": KWARGS, "layers": LAYERS}, indent=1))
    tail = losses[-50:]
    return {"cases": cases, "seed": seed, "steps": steps, "seconds": round(trained, 1), "crop_zyx": list(CROP),
            "batch": 4, "final_loss_mean_last_50": round(sum(tail) / len(tail), 4),
            "held_out_dice": held_out_dice(network, held_out), "kwargs": KWARGS, "layers": LAYERS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="weights folder to write (must not exist)")
    parser.add_argument("--cases", type=int, default=12, help="training phantoms")
    parser.add_argument("--seed", type=int, default=1, help="phantom seed of the training cases")
    parser.add_argument("--seconds", type=float, default=300.0, help="training budget")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--name", default="phantom_segmenter", help="file stem of the record")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the record goes")
    parser.add_argument("--note", default="", help="recorded with the results (machine state, purpose)")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: --out {args.out}: already exists; name a new folder", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPOSITORY))
    from latent.core.provenance import git_revision, machine_description

    load_before = os.getloadavg()
    record = train(args.out, args.cases, args.seed, args.seconds, args.threads)
    record = {"script": "benchmarks/train_phantom_segmenter.py", "git": git_revision(), "machine": machine_description(),
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "note": args.note, **record}
    header = (f"written by benchmarks/train_phantom_segmenter.py at git {record['git']}, {record['date']}, "
              f"{record['machine']}, load average {load_before[0]:.2f} before / "
              f"{record['load_average_after'][0]:.2f} after. {args.note}")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    dice = record["held_out_dice"]
    lines = [f"<!-- {header} -->", "# Phantom tissue segmenter (features for `latent register --method feature`)", "",
             f"MONAI DynUNet (filters {KWARGS['filters']}), trained {record['steps']} steps in {record['seconds']} s on "
             f"{args.cases} small phantoms (seed {args.seed}), crops {CROP} (z, y, x), batch 4: each crop as MR and as CT "
             f"with the same labels; DiceCE loss, last 50 steps {record['final_loss_mean_last_50']}.", "",
             f"Held-out mean Dice over the tissues present (3 phantoms, seed {args.seed + 1}): from MR {dice['mr']}, "
             f"from CT {dice['ct']}. Feature layer: {', '.join(LAYERS)}.", ""]
    (args.results / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
