"""Training history of a model run (``cpldm train``).

Layout of one run (see ``pipelines/train.py``):

- ``models/<run>/config.json`` (training config, model kind, vae/encoder ids, latent shape) and
  ``models/<run>/vocab.json`` (confounder vocabularies), written before training starts;
- ``models/<run>/checkpoint_*/`` Ray Train checkpoints: ``checkpoint.pt`` (model, optimiser, EMA, step, epoch),
  ``config.json``, ``vocab.json``; ``models/<run>/checkpoint_manager_snapshot.json`` is Ray Train's index of them;
- ``models/<run>/final/``: the exported model (``ConfounderAwareDenoiser.save_pretrained``: ``config.json``,
  ``vocab.json``, ``weights.pt``) that generation loads without Ray Train;
- ``models/<run>/loss.png``: loss curves;
- table ``train_history`` below, in its own directory so that reading it never scans checkpoint files.
"""
import pyarrow as pa

from storage_schemas.spec import TableSpec, register

TRAIN_HISTORY = register(TableSpec(
    name="train_history",
    path="train_history",  # train_history/run=<run>/steps-<first>-<last>.parquet (one part per checkpoint)
    partitioning=("run",),
    description="loss per optimiser step (train) and per validation pass (val, held-out batches)",
    schema=pa.schema([
        pa.field("run", pa.string()),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),   # train | val
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("samples_per_s", pa.float64()),          # per worker, train rows only
    ]),
))
