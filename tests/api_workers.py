"""Worker functions for the Python API tests (importable by processes the elastic launcher spawns)."""

from __future__ import annotations

import os


def tiny_causal_lm(seed: int = 0):
    """A 2-layer random Llama from transformers (no Unsloth: these tests check our math, fast)."""
    model = tiny_llama(seed).float()
    for name, p in model.named_parameters():  # train a few tensors only, like an adapter
        p.requires_grad = "q_proj" in name or "lm_head" in name
    return model


def tiny_llama(seed: int = 0):
    """A 2-layer random transformers Llama, every parameter trainable."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def variable_length_batches(num_batches: int = 4, rows: int = 5, seed: int = 1):
    """Global batches with rows of different lengths (uneven token counts per rank), right-padded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        lengths = torch.randint(3, 17, (rows,), generator=g)
        ids = torch.randint(1, 64, (rows, int(lengths.max())), generator=g)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def epoch_batches() -> list:
    """Four global batches of 5 rows, then a last one of 1 row (a DataLoader's remainder: fewer rows than ranks)."""
    return variable_length_batches() + variable_length_batches(num_batches=1, rows=1, seed=2)


def rank_average_reference(aggregation: str, world: int) -> dict:
    """What `mean` and `sum` promise, computed in one process with plain torch: every global batch is cut into
    `world` row slices as the ranks hold them (the first `rows % world` slices one row longer), each slice's loss is
    its own token mean, and the update follows their average (`mean`) or their sum (`sum`). AdamW (lr 1e-2),
    gradient norm clipped to 1, as in `direct_trainer_run`."""
    import torch

    model = tiny_causal_lm()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for batch in epoch_batches():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        base, extra = divmod(int(ids.shape[0]), world)
        losses, start = [], 0
        for r in range(world):
            end = start + base + (1 if r < extra else 0)
            if end > start:  # a rank without rows (a last batch smaller than the world) adds nothing
                losses.append(
                    model(input_ids=ids[start:end], attention_mask=mask[start:end], labels=labels[start:end]).loss
                )
            start = end
        total = torch.stack(losses).sum()
        (total / world if aggregation == "mean" else total).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}


def direct_trainer_run(aggregation: str, num_gpus: int | None, bad_batch: int | None = None) -> dict:
    """Train the tiny model with MultiGPUTrainer over the same global batches; return the trainable weights.

    bad_batch: launched, rank 1's loss on that batch is NaN (its gradient too); in one process, that batch is left
    out (what skipping it on every rank must equal)."""
    return direct_trainer_runs([(aggregation, num_gpus, bad_batch)])[0]


def direct_trainer_runs(cases: list[tuple[str, int | None, int | None]]) -> list[dict]:
    """`direct_trainer_run` for each case, in one process group when launched (a launch costs seconds)."""
    os.environ["MGPU_DEVICE_TYPE"] = "cpu"
    from unsloth_mgpu_cli import distributed as D
    from unsloth_mgpu_cli import hooks

    launched = "RANK" in os.environ
    if launched:  # what enable_multi_gpu does in a worker, without importing Unsloth
        hooks._STATE.info = D.setup_worker(timeout_seconds=120)
    try:
        return [_direct_trainer_case(*case, launched=launched) for case in cases]
    finally:
        if launched:
            hooks._STATE.info = None
            D.teardown()


def _direct_trainer_case(aggregation: str, num_gpus: int | None, bad_batch: int | None, launched: bool) -> dict:
    from unsloth_mgpu_cli.direct import MultiGPUTrainer

    model = tiny_causal_lm()
    trainer = MultiGPUTrainer(
        model=model,
        num_gpus=num_gpus,
        optimizer_config={"class": "adamw", "kwargs": {"lr": 1e-2}},
        aggregation_method=aggregation,
        max_grad_norm=1.0,
        verify_every=1,
    )
    trainer.setup()
    batches = epoch_batches()
    if bad_batch is not None and not launched:
        del batches[bad_batch]
    elif bad_batch is not None and trainer.rank == 1:
        forward, calls = model.forward, []

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            calls.append(1)
            if len(calls) == bad_batch + 1:
                out.loss = out.loss * float("nan")
            return out

        model.forward = poisoned
    stats = trainer.train_epoch(batches)
    return {
        "rank": trainer.rank,
        "stats": stats,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
    }


def hook_settings_checks() -> dict:
    """Hook mode's check before the first step (`hooks._check_same_settings`) on this rank, for four trainers:
    the same settings on every rank, rank 1 with twice the batch (a script sizing it from its own GPU), or with
    twice the accumulation, and an iterable dataset. Returns each case's error (type and message), or None."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import TrainingArguments

    from unsloth_mgpu_cli import distributed as D
    from unsloth_mgpu_cli import hooks

    os.environ["MGPU_DEVICE_TYPE"] = "cpu"
    info = D.setup_worker(timeout_seconds=60)
    rows = Dataset.from_list([{"text": f"row {i}"} for i in range(16)])
    config = hooks.MultiGPUConfig(gradient_aggregation="weighted")
    out = {}
    try:
        for case, batch, accumulation, data in (
            ("same", 2, 1, rows),
            ("batch", 2 * (info.rank + 1), 1, rows),
            ("accumulation", 2, 1 + info.rank, rows),
            ("iterable", 2, 1, rows.to_iterable_dataset()),
        ):
            args = TrainingArguments(
                output_dir="/tmp/unused",
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_steps=4,
            )
            try:
                hooks._check_same_settings(SimpleNamespace(args=args, train_dataset=data), config, info)
                out[case] = None
            except (RuntimeError, NotImplementedError) as exc:
                out[case] = (type(exc).__name__, str(exc))
    finally:
        D.teardown()
    return out


def direct_trainer_refusals() -> dict:
    """The direct trainer on this rank with data the ranks do not agree on, one trainer per case, in one group:
    rank 1's loader has one batch more ("longer"), rank 1 gets the same rows in another order ("reordered"); and a
    batch with every label masked ("masked"). Returns each case's RuntimeError message, or its stats and whether
    the weights changed."""
    import torch

    from unsloth_mgpu_cli import distributed as D
    from unsloth_mgpu_cli import hooks
    from unsloth_mgpu_cli.direct import MultiGPUTrainer

    os.environ["MGPU_DEVICE_TYPE"] = "cpu"
    hooks._STATE.info = D.setup_worker(timeout_seconds=60)
    rank, out = hooks._STATE.info.rank, {}
    batches = variable_length_batches(num_batches=2)
    masked = {**batches[0], "labels": torch.full_like(batches[0]["input_ids"], -100)}
    cases = {
        "longer": batches[: 1 + rank],
        "reordered": [{k: v[[1, 0, 2, 3, 4]] if rank else v for k, v in batches[0].items()}],
        "masked": [masked],
    }
    try:
        for case, data in cases.items():
            model = tiny_causal_lm()
            trainer = MultiGPUTrainer(model=model, num_gpus=2, optimizer_config={"class": "adamw"})
            trainer.setup()
            before = [p.detach().clone() for p in trainer.params]
            try:
                stats = trainer.train_epoch(data)
                changed = any(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))
                out[case] = {"steps": stats["steps"], "skipped": stats["skipped_steps"], "changed": changed}
            except RuntimeError as exc:
                out[case] = str(exc)
    finally:
        hooks._STATE.info = None
        D.teardown()
    return out
