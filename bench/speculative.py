"""Self-speculative decoding with the MTP head on a trained mirror: acceptance rate and speedup.

Trains the shipped `tiny` config with one multi-token-prediction module (num_mtp_layers: 1,
mtp_loss_coef 0.3) on the default corpus (the standard library's source, bytes), then decodes
the same prompts greedily twice: plain (`moe.generate.generate`) and speculative
(`moe.speculative.speculative_generate`: the MTP module drafts, the main model verifies in one
forward). The two outputs must be identical token for token; the script asserts it. Reported:
acceptance rate (accepted / drafted), tokens per verify forward, wall times, speedup = plain /
speculative, per prompt and in total. Results: bench/results/<device>/speculative-tiny-mtp.json.

usage: python bench/speculative.py [--steps 200] [--new-tokens 64] [--draft-len 1] [--save]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe import Transformer, load_config
from moe.generate import generate
from moe.perf import results
from moe.speculative import benchmark
from moe.train import TrainArgs, run

PROMPTS = ["def ", "import os\n", "class Config:\n    def __init__(self", "    return "]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of the MTP mirror")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-len", type=int, default=1, help="tokens the MTP module drafts per round")
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args()

    config = dataclasses.replace(load_config("tiny"), name="tiny-mtp", num_mtp_layers=1, mtp_loss_coef=0.3)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(config, TrainArgs(steps=args.steps, out=tmp, progress=False, plots=False))
        model = Transformer.from_pretrained(Path(tmp) / "checkpoints" / f"step_{args.steps:08d}")
    model.eval()
    print(f"trained {args.steps} steps: val loss {summary['val_loss']:.3f} nats/token")

    rows = []
    for text in PROMPTS:
        prompt = torch.tensor([list(text.encode())])
        benchmark(model, prompt, 8, args.draft_len)  # warm-up
        row = benchmark(model, prompt, args.new_tokens, args.draft_len)
        assert row["identical"], f"speculative output differs from greedy on {text!r}"
        greedy = generate(model, prompt, args.new_tokens, temperature=0)
        output = bytes(greedy[0, prompt.shape[1] :].tolist()).decode(errors="replace")  # what was decoded
        rows.append({"prompt": text, "output": output, **row})
        print(
            f"  {text!r:42} acceptance {row['acceptance_rate']:.2f}  tokens/verify {row['tokens_per_round']:.2f}"
            f"  plain {row['plain_s'] * 1e3:7.1f} ms  speculative {row['speculative_s'] * 1e3:7.1f} ms"
            f"  speedup {row['speedup']:.2f}x"
        )
        print(f"    -> {output[:70]!r}")
    plain, spec = sum(r["plain_s"] for r in rows), sum(r["speculative_s"] for r in rows)
    total = {
        "acceptance_rate": sum(r["acceptance_rate"] for r in rows) / len(rows),
        "speedup": plain / spec,
        "identical": all(r["identical"] for r in rows),
    }
    print(f"all prompts: acceptance {total['acceptance_rate']:.2f}, speedup {total['speedup']:.2f}x, identical")
    if args.save:
        env = results.environment(torch.device("cpu"))
        settings = {"steps": args.steps, "new_tokens": args.new_tokens, "draft_len": args.draft_len}
        record = results.record(
            "speculative", env, dataclasses.asdict(config), settings, {"prompts": rows, "total": total}
        )
        print("saved", results.save(record, "speculative-tiny-mtp", args.results_dir))


if __name__ == "__main__":
    main()
