"""Memory size against NLL for each compression option, on a tiny model and templated data.

Builds a memory (eta chosen on a held-out slice) for a tiny random OLMoE-style model, then
compresses it every way ``mlx_knnmoe.compress_memory`` can and prints the file size and the
mean target NLL with the memory attached, on the reference examples themselves (where the
memory helps most) and on held-out examples of the same template. Offline; a few minutes:
python examples/compress_memory.py
"""

import json
import random
import tempfile
from pathlib import Path

from mlx_knnmoe import KNNConfig, build_memory, load
from mlx_knnmoe.build.eta_choice import heldout_nll
from mlx_knnmoe.data.batches import length_groups, make_batch
from mlx_knnmoe.data.examples import load_dataset
from mlx_knnmoe.memory.compress import compress
from mlx_knnmoe.speed.random_models import random_model, save_model_dir, tiny_config

# a small OLMoE-style model with random weights (3 layers, hidden 64, 8 experts, top-2)
OLMOE = tiny_config("olmoe")

SYMPTOMS = {
    "fever and cough": "pneumonia",
    "chest pain": "angina",
    "thirst and weight loss": "diabetes",
    "headache and stiff neck": "meningitis",
    "jaundice": "hepatitis",
    "wheezing": "asthma",
}


def records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        symptom, answer = rng.choice(list(SYMPTOMS.items()))
        prompt = f"A {rng.randint(18, 90)}-year-old presents with {symptom}. Diagnosis:"
        out.append({"prompt": prompt, "completion": f" {answer}."})
    return out


def batches(path: Path, tokenizer, n: int) -> list:
    examples = load_dataset(path, tokenizer, "completion").examples[:n]
    lengths = [len(e.tokens) for e in examples]
    return [make_batch(examples, rows) for rows in length_groups(lengths, 2048)]


VARIANTS = {
    "float32 (as built)": {},
    "float16 keys": {"keys": "float16"},
    "int8 keys": {"keys": "int8"},
    "PCA 32 of 64": {"pca": 32},
    "PCA 16 of 64": {"pca": 16},
    "PCA 8 of 64": {"pca": 8},
    "pruned": {"prune": True},
    "pruned + int8": {"prune": True, "keys": "int8"},
    "pruned + PCA 16 + int8": {"prune": True, "pca": 16, "keys": "int8"},
}

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    model, tokenizer = load(str(save_model_dir(random_model(OLMOE), OLMOE, tmp / "model")))
    for name, n, seed in [("ref", 300, 0), ("heldout", 100, 1)]:
        lines = "".join(json.dumps(r) + "\n" for r in records(n, seed))
        (tmp / f"{name}.jsonl").write_text(lines)
    config = KNNConfig(k=1, search="exact")
    memory = build_memory(
        model, tokenizer, tmp / "ref.jsonl", format="completion", retrieval=config
    )
    # NLL on 100 reference examples (their own entries are in the memory) and 100 new ones
    data = {name: batches(tmp / f"{name}.jsonl", tokenizer, 100) for name in ("ref", "heldout")}
    plain = {name: heldout_nll(model, b, None, config) for name, b in data.items()}
    print(f"eta {memory.build['eta']}, {memory.num_entries()} entries per layer")
    print(f"| variant | size (kB) | size | entries | NLL ref | NLL held-out |\n|{'---|' * 6}")
    print(f"| no memory | 0 | | | {plain['ref']:.4f} | {plain['heldout']:.4f} |")
    base = None
    for name, options in VARIANTS.items():
        small = compress(memory, model=model, **options)  # with the model: adds a router probe
        size = small.save(tmp / "m.st", force=True).stat().st_size
        base = base or size
        nll = {k: heldout_nll(model, b, small, config) for k, b in data.items()}
        print(
            f"| {name} | {size / 1e3:.0f} | {size / base:.1%} | {sum(small.num_entries().values())}"
            f" | {nll['ref']:.4f} | {nll['heldout']:.4f} |"
        )
