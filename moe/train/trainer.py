"""Training: `moe train --config CONFIG` and its Python API, `run(config, TrainArgs(...))`.

Legend: B = sequences per micro-batch, S = tokens per sequence.

`run` picks the runtime (one process, or one of torchrun's ranks) and hands it to a Trainer:
    Trainer(config, args, runtime)   checks the input (device, data, the checkpoint to resume),
                                     builds data, model and optimizer, locks the run folder
                                     (run_lock.py), resumes, and only then writes the folder
    .fit()                           the steps (step.py's train_step), with metrics rows, evals
                                     and checkpoints as args say, then the plots
    .summary()                       what the run reached, read back from metrics.jsonl
    .close()                         releases the run folder's lock
Host syncs happen only on logging, eval and save steps; a non-finite loss is recorded on the
device and reported (with its step) at the next of those.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..config import ModelConfig
from ..distributed.mesh import under_torchrun
from ..errors import InputError
from ..extras import MissingExtra, require
from ..io import checkpoint
from ..io.files import TRAINER_FILE, write_atomic
from . import metrics, tensorboard_log
from .args import TrainArgs
from .data import BatchSampler, TokenView, check_length, check_vocab, eval_batches, load_corpus, split_ranges
from .distributed_runtime import Distributed
from .resume import check_resume, check_trainer_state
from .run_folder import check_run_dir, clear_run_dir, locate_run, rng_state, set_rng_state
from .run_lock import RunLock
from .runtime import Runtime, SingleProcess
from .step import build_model, build_optimizer, lr_at, moe_stats, train_step


class TrainingDiverged(InputError):
    """The loss became NaN or inf; the last good checkpoint is left in place. An InputError (a
    ValueError): the settings that made it diverge are the user's to change, so the command line
    reports it as one line, not a traceback."""


def run(config: ModelConfig, args: TrainArgs) -> dict[str, Any]:
    """Train `config` as `args` say, in the run folder; returns a summary:

    run_dir, step, steps (--steps), stopped_by ("steps", "stop_at" or "time_limit"), tokens,
    params, loss (last train row), val_loss_start / val_loss (nats per token) and val_bpb_start /
    val_bpb (bits per byte; None for token data), tokens_per_s (median over train rows),
    elapsed_s, drop_rate, load ({layer: per-expert share, mean of the last 10 train rows}),
    checkpoint (latest folder), metrics (path), plots (paths).

    Launched by torchrun, every rank runs this with the Distributed runtime (expert and data
    parallelism, sharded checkpoints); rank 0 writes the run folder.
    """
    with make_runtime(args) as runtime:
        trainer = Trainer(config, args, runtime)
        try:
            trainer.fit()
            return trainer.summary()
        finally:
            trainer.close()


def make_runtime(args: TrainArgs) -> Runtime:
    """Distributed when torchrun launched this process, else SingleProcess."""
    if under_torchrun():
        return Distributed(args)
    return SingleProcess(args)


class Trainer:
    """One training run in its run folder, on the runtime's rank(s). close() when done."""

    def __init__(self, config: ModelConfig, args: TrainArgs, runtime: Runtime):
        self.config, self.args, self.rt = config, args, runtime
        self.lock: RunLock | None = None
        # Everything that can fail on bad input (args were checked when built) happens before
        # the run folder is touched: a rerun after a bad flag finds the folder as it was.
        self.device = runtime.device(args.device)
        if args.tensorboard:
            tensorboard_log.check_available()
        self.run_dir, resume_from, continuing = locate_run(config.name, args.out, args.resume, args.overwrite)
        self._load_data()
        if resume_from is not None:
            check_resume(resume_from, config, args)
        # The seed right before the model: the initial weights depend on nothing before it.
        torch.manual_seed(args.seed)
        model = build_model(config, self.device)
        self.params = sum(p.numel() for p in model.parameters())
        self.model = runtime.wrap(model)
        self.optimizer = build_optimizer(self.model, args)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self._lock_run_dir()  # from here on, close() releases the folder
        try:
            if not continuing:  # another run may have finished there since locate_run looked
                check_run_dir(self.run_dir, args.overwrite)
            if resume_from is not None:
                self._resume(resume_from)
            self._prepare_run_dir(continuing)
        except BaseException:
            self.close()
            raise
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tokens_per_step = args.batch_size * self.seq_len * args.grad_accum * runtime.world_size
        self.plots: list[Path] = []
        self.stopped_by = "steps"

    def close(self) -> None:
        """Release the run folder (see run_lock.py); safe to call twice."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _lock_run_dir(self) -> None:
        """Rank 0 takes the run folder's lock for the whole job; every rank learns whether it did."""
        error: BaseException | None = None
        if self.rt.is_main:
            self.lock = RunLock(self.run_dir)
            try:
                self.lock.acquire()
            except Exception as e:  # every rank must hear of it, or the others would wait forever
                self.lock, error = None, e
        if self.rt.any(error is not None):
            raise error or InputError(f"rank 0 could not lock the run folder {self.run_dir}")

    def _load_data(self) -> None:
        args, rt = self.args, self.rt
        self.corpus = load_corpus(args.data, args.token_dtype)
        check_vocab(self.corpus, self.config.vocab_size)
        self.seq_len = args.seq_len or self.config.max_seq_len
        if self.seq_len > self.config.max_seq_len:
            raise InputError(f"--seq-len {self.seq_len} exceeds the config's max_seq_len ({self.config.max_seq_len})")
        check_length(self.corpus, args.val_fraction, self.seq_len, rt.world_size)
        train_ranges, val_ranges = split_ranges(len(self.corpus.tokens), args.val_fraction)
        self.sampler = BatchSampler(
            TokenView(self.corpus.tokens, train_ranges),
            args.batch_size,
            self.seq_len,
            args.seed,
            rt.rank,
            rt.world_size,
        )
        # One validation set for any number of ranks: each evaluates its rows of every batch.
        mine = slice(rt.rank * args.batch_size, (rt.rank + 1) * args.batch_size)
        self.val_set = [
            (x_BS[mine], y_BS[mine])
            for x_BS, y_BS in eval_batches(
                TokenView(self.corpus.tokens, val_ranges),
                args.batch_size * rt.world_size,
                self.seq_len,
                args.eval_batches,
            )
        ]

    def _resume(self, path: Path) -> None:
        state = self.rt.load_checkpoint(path, self.model, self.optimizer)
        check_trainer_state(state, path / TRAINER_FILE, self.args)  # check_resume read it; this is what loaded
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], float(state["elapsed_s"])
        self.sampler.load_state_dict(state["data"])
        set_rng_state(state["rng"], str(path / TRAINER_FILE))

    def _prepare_run_dir(self, continuing: bool) -> None:
        """Rank 0 clears (--overwrite) or creates the run folder and, for a new run, writes run.json."""
        self.rt.barrier()  # every rank has checked the run folder before rank 0 changes it
        if not self.rt.is_main:
            return
        if self.args.overwrite and not continuing:
            clear_run_dir(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not continuing:
            record = {
                "config": self.config.to_dict(),
                "args": dataclasses.asdict(self.args),
                "data": self.corpus.source,
                "params": self.params,
                "torch": torch.__version__,
                "device": str(self.device),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **self.rt.describe(),
            }
            write_atomic(self.run_dir / "run.json", json.dumps(record, indent=2).encode())

    # ----------------------------------------------------------------------- the loop

    def fit(self) -> None:
        """Train up to --steps (or --stop-at, or --time-limit), then draw the plots."""
        args, rt = self.args, self.rt
        # A resumed run drops the rows logged after its checkpoint (see MetricsLog), and the
        # TensorBoard events too (purge_step).
        self.log = metrics.MetricsLog(self.run_dir / "metrics.jsonl", keep_until_step=self.step) if rt.is_main else None
        self.tb = None
        if args.tensorboard and rt.is_main:
            self.tb = tensorboard_log.TensorBoardLog(self.run_dir, resume_step=self.step or None)
        last = min(args.steps, args.stop_at or args.steps)
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step
        self._t0, self._elapsed0 = time.perf_counter(), self.elapsed
        # Throughput rows exclude the time spent evaluating and saving (`_paused`).
        self._t_row, self._tokens_row, self._paused = self._clock(), self.tokens, 0.0
        bar = tqdm(
            total=args.steps,
            initial=self.step,
            desc=self.config.name,
            disable=not (args.progress and rt.is_main),
            dynamic_ncols=True,
            unit="step",
        )
        try:
            if self.step == 0:
                self._evaluate()
            while self.step < last:
                out = self._train_step()
                bar.update(1)
                timed_out = args.time_limit is not None and rt.any(self._clock() - self._elapsed0 > args.time_limit)
                stop = self.step == last or timed_out
                if stop:
                    self.stopped_by = (
                        "steps" if self.step == args.steps else "stop_at" if self.step == last else "time_limit"
                    )
                if self.step % args.log_every == 0 or stop:
                    self._check_finite()
                    row = self._log_row(out)
                    bar.set_postfix_str(
                        f"loss {row['loss']:.3f}  {row['tokens_per_s']:,.0f} tok/s  drop "
                        f"{row['drop_rate']:.1%}  load max/mean {row['load_max_mean']:.2f}"
                    )
                t_pause = self._clock()
                if self.step % args.eval_every == 0 or stop:
                    self._check_finite()
                    self._evaluate()
                if self.step % args.save_every == 0 or stop:
                    self._check_finite()
                    self._save()
                self._paused += self._clock() - t_pause
                if stop:
                    break
        finally:
            bar.close()
            if self.log:
                self.log.close()
            if self.tb:
                self.tb.close()
        rt.barrier()  # rank 0 has written metrics.jsonl
        self.plots = _draw_plots(self.run_dir) if args.plots and rt.is_main else []

    def _clock(self) -> float:
        """Training wall time so far, the time before a resume included."""
        return self._elapsed0 + time.perf_counter() - self._t0

    def _train_step(self) -> dict[str, Tensor]:
        """The next step: its learning rate, train_step on every rank, and a note if its loss is not finite."""
        self.step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.args)
        out = self.rt.reduce_step(
            train_step(
                self.model, self.forward, self.optimizer, self.sampler, self.args, self.device, self.rt.clip_gradients
            )
        )
        self.tokens += self.tokens_per_step
        finite = torch.isfinite(out["loss"] + out["aux_loss"])
        self._bad_step = torch.where((self._bad_step < 0) & ~finite, self.step, self._bad_step)
        return out

    def _check_finite(self) -> None:
        bad = int(self._bad_step)  # host sync, on log / eval / save steps only
        if bad >= 0:
            kept = checkpoint.checkpoint_dirs(self.ckpt_root)
            raise TrainingDiverged(
                f"loss became nan or inf at step {bad}; stopped. The last good checkpoint "
                f"is {kept[-1] if kept else 'none (none was saved)'}"
            )

    def _log_row(self, out: dict[str, Tensor]) -> dict[str, Any]:
        """The step's train row (metrics.py), written by rank 0; returns it."""
        layers = moe_stats(self.model)
        now = self._clock()
        row = {
            "kind": "train",
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": round(now, 3),
            "lr": self.optimizer.param_groups[0]["lr"],
            **{k: float(v) for k, v in out.items()},
            "tokens_per_s": (self.tokens - self._tokens_row) / max(now - self._t_row - self._paused, 1e-9),
            "drop_rate": sum(r["drop_rate"] for r in layers) / len(layers) if layers else 0.0,
            "load_max_mean": max((max(r["load"]) * len(r["load"]) for r in layers), default=1.0),
            "layers": layers,
        }
        self._write(row)
        self._t_row, self._tokens_row, self._paused = now, self.tokens, 0.0
        return row

    def _evaluate(self) -> None:
        """Validation loss on the fixed set; an eval row."""
        val = self.rt.evaluate(self.forward, self.val_set, self.device)
        self._write(
            {
                "kind": "eval",
                "step": self.step,
                "tokens": self.tokens,
                "elapsed_s": round(self._clock(), 3),
                "val_loss": val,
                "val_bpb": metrics.bits(val) if self.corpus.is_bytes else None,
            }
        )

    def _write(self, row: dict[str, Any]) -> None:
        """A metrics row to metrics.jsonl and, with --tensorboard, to TensorBoard (rank 0 only)."""
        if self.log:
            self.log.write(row)
        if self.tb:
            self.tb.write(row)

    def _save(self) -> None:
        state = {
            "tokens": self.tokens,
            "elapsed_s": self._clock(),
            "data": self.sampler.state_dict(),
            "rng": rng_state(),
            "args": dataclasses.asdict(self.args),
        }
        self.rt.save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, state, self.args.keep_last)
        if self.tb:
            self.tb.flush()  # the events up to the checkpoint survive a kill, as the metrics rows do

    # ----------------------------------------------------------------------- after the loop

    def summary(self) -> dict[str, Any]:
        """What `run` returns (see there), from metrics.jsonl and the checkpoints; after fit()."""
        rows = metrics.read_rows(self.run_dir / "metrics.jsonl")
        first, final = metrics.eval_endpoints(rows)
        train_rows = [r for r in rows if r["kind"] == "train"]
        speeds = sorted(r["tokens_per_s"] for r in train_rows)
        kept = checkpoint.checkpoint_dirs(self.ckpt_root)
        return {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "steps": self.args.steps,
            "stopped_by": self.stopped_by,
            "tokens": self.tokens,
            "params": self.params,
            "loss": train_rows[-1]["loss"] if train_rows else None,
            "val_loss_start": first and first["val_loss"],
            "val_loss": final and final["val_loss"],
            "val_bpb_start": first and first["val_bpb"],
            "val_bpb": final and final["val_bpb"],
            "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
            "elapsed_s": self._clock(),
            "drop_rate": train_rows[-1]["drop_rate"] if train_rows else None,
            "load": metrics.final_load(rows),
            "checkpoint": str(kept[-1]) if kept else None,
            "metrics": str(self.run_dir / "metrics.jsonl"),
            "plots": [str(p) for p in self.plots],
        }


def _draw_plots(run_dir: Path) -> list[Path]:
    try:
        require("matplotlib", "--plots")  # optional for the library: a note, not a failure
    except MissingExtra as e:
        tqdm.write(f"plots skipped: {e}")
        return []
    from .plots import draw_run

    return draw_run(run_dir)
