"""The quality price of each compact memory format on the bundled benchmark.

Builds the demo's memory (shifted reference split, eta auto) on the bundled model, or reads
one (--memory), then scores the plain model and the memory in each format on the shifted and
original text test splits, with the paired bootstrap intervals ``mlx_knnmoe.evaluate``
prints: float32 (built with float32 values), the build's default output (keys as built,
float16 values), float16, int8 (row scales), int8 with PCA to d/2, d/4, d/8, values kept for
the top 2k and top k experts only (memory/values.py), and IVF search at a few nprobe values
over the int8 keys. Offline; about ten minutes on 2 cores:

python examples/compact_formats.py --test-examples 200 --out formats.json
"""

import argparse
import json

from mlx_lm import load

from mlx_knnmoe import KNNConfig, Memory
from mlx_knnmoe.bundled import DATA_DIR, MODEL_DIR
from mlx_knnmoe.evaluation.bundled_demo import build_demo_memory, load_split
from mlx_knnmoe.evaluation.compare import compare, score_variants, table
from mlx_knnmoe.memory.compress import compress

SPLITS = ("shift_test_text", "orig_test_text")


def variants(memory: Memory) -> dict[str, tuple[Memory, dict]]:
    """Each format's memory and its search settings (over the memory's recorded defaults)."""
    d = int(memory.keys[memory.layers[0]].shape[1])
    k = int(memory.fingerprint["top_k"])
    exact = {"search": "exact"}
    int8 = compress(memory, keys="int8", values="float16")
    out = {
        "float32": (memory, exact),
        "build default": (compress(memory, values="float16"), exact),
        "float16": (compress(memory, keys="float16", values="float16"), exact),
        "int8": (int8, exact),
    }
    for n in (2, 4, 8):
        out[f"int8 pca d/{n}"] = (
            compress(memory, pca=d // n, keys="int8", values="float16"),
            exact,
        )
    for m in (2 * k, k):
        out[f"top-{m} values"] = (compress(memory, top_experts=m), exact)
    out[f"int8 pca d/4 top-{2 * k}"] = (
        compress(memory, pca=d // 4, keys="int8", top_experts=2 * k),
        exact,
    )
    indexed = compress(int8, ivf=0)
    for nprobe in (1, 2, 4):
        out[f"int8 ivf nprobe {nprobe}"] = (indexed, {"search": "ivf", "nprobe": nprobe})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default=None, help="A memory of the bundled model to start from.")
    ap.add_argument("--test-examples", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="Write the summaries as JSON.")
    args = ap.parse_args()
    model, tokenizer = load(str(MODEL_DIR))
    if args.memory:
        memory = Memory.load(args.memory)
    else:
        memory = build_demo_memory(
            model, tokenizer, DATA_DIR, None, "auto", "auto", KNNConfig(k=1), print,
            values="float32",
        )  # fmt: skip
    cases = variants(memory)
    summaries = {}
    for split in SPLITS:
        items, examples = load_split(DATA_DIR / f"{split}.jsonl", tokenizer, args.test_examples)
        runs = [("plain", None, None)] + [
            (name, mem, KNNConfig.from_memory_defaults(mem.retrieval, **config))
            for name, (mem, config) in cases.items()
        ]
        results = score_variants(model, tokenizer, items, examples, runs, 4096)
        for name, mem, _ in runs:
            results[name]["memory"] = None if mem is None else mem.nbytes()
        summaries[split] = compare(results, False, 1000, args.seed, 2)
        print(f"\n{split}:\n{table(summaries[split], False)}")
        for row in summaries[split]["variants"]:
            if row["memory"]:
                print(f"  {row['name']}: {row['memory'] / 1e6:.2f} MB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summaries, f, indent=2)


if __name__ == "__main__":
    main()
