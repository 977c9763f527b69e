"""Training pairs from a packed database, as your own training loop would take them.

    python examples/load_pairs.py DB [dali|torch]
"""
import sys

import torch

import srdata


def make(db: str, kind: str):
    # srtrain's defaults are batch_size=32, patch_size=256; small here so that it runs anywhere
    return srdata.make_loader(db, loader=kind, batch_size=4, patch_size=128, scale=4, seed=0,
                              workers=1)  # on the GPU when there is one


def main(db: str, kind: str = "dali") -> None:
    loader = make(db, kind)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for lr, hr in loader:  # NCHW, channels_last, float32 in [0, 1]
            pass               # your step: loss = l1(model(lr), hr); loss.backward(); ...
        print(f"epoch {epoch}: {len(loader)} batches of lr {tuple(lr.shape)}, "
              f"hr {tuple(hr.shape)} on {hr.device}")

    # Resume mid-epoch: the state after k batches, given to a new loader, yields batch k next.
    loader.set_epoch(2)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()  # {"epoch": 2, "batch": 1, ...}: save it with your checkpoint
    expected = next(batches)[1]
    resumed = make(db, kind)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))[1], expected)
    print("resumed at epoch", state["epoch"], "batch", state["batch"], "with the same batch")


if __name__ == "__main__":  # the loaders start worker processes, which import this file
    main(*sys.argv[1:])
