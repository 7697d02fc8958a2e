"""mlx_knnmoe.server through the official openai client: chat and completions, streaming
and not, per-request memories, errors, the prompt cache, and a bounded concurrent load."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

from mlx_knnmoe.commands.generate import cli as generate_cli
from mlx_knnmoe.serving.memory_bank import MemoryBank
from mlx_knnmoe.serving.server import server_args, start_server
from tests.conftest import MEMORY_PROMPT
from tests.helpers import force_expert, memory_from

openai = pytest.importorskip("openai")

MAX_TOKENS = 8
PROMPTS = ["The patient presents with", "The patient presents with fever and", "The patient"]
ROUTINGS = ["med", "law", "none"]


@pytest.fixture(scope="module")
def memories(qwen_dir, tmp_path_factory):
    """Two memories of the same keys (the prompts, plain and as chats) whose values force
    different experts (0 and 7)."""
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(qwen_dir))
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    rendered = [
        tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats
    ]
    keys = mx.array([tok.encode(MEMORY_PROMPT + "".join(rendered))])
    folder = tmp_path_factory.mktemp("memory")
    return {
        name: memory_from(model, keys, force_expert(e), retrieval={"k": 1}).save(
            folder / f"{name}.st"
        )  # one neighbour: the exact key, so each memory's expert wins
        for name, e in (("med", 0), ("law", 7))
    }


def generated(qwen_dir, memories, routing: str, prompt: str, chat: bool) -> str:
    """What mlx_knnmoe.generate prints for the prompt, greedy, with the routing's memory."""
    args = ["--model", str(qwen_dir), "-p", prompt, "-m", str(MAX_TOKENS), "--quiet"]
    args += [] if chat else ["--ignore-chat-template"]
    args += [] if routing == "none" else ["--memory", str(memories[routing])]
    result = CliRunner().invoke(generate_cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


@pytest.fixture(scope="module")
def expected(qwen_dir, memories):
    """(routing, prompt, chat) -> the generate command's answer (computed before serving)."""
    return {
        (r, p, chat): generated(qwen_dir, memories, r, p, chat)
        for r in ROUTINGS
        for p in PROMPTS
        for chat in (False, True)
    }


@pytest.fixture(scope="module")
def server(qwen_dir, memories, expected):
    specs = [f"{name}={path}" for name, path in memories.items()]
    bank = MemoryBank.load(specs, str(qwen_dir))
    running = start_server(server_args(str(qwen_dir), max_tokens=MAX_TOKENS), bank)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def ask(client, model: str, routing: str | None, prompt: str, chat: bool, stream=False) -> str:
    extra = {} if routing is None else {"memory": routing}
    if chat:
        messages = [{"role": "user", "content": prompt}]
        out = client.chat.completions.create(
            model=model, messages=messages, stream=stream, extra_body=extra, temperature=0.0
        )
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in out if c.choices)
        return out.choices[0].message.content or ""
    out = client.completions.create(
        model=model, prompt=prompt, stream=stream, extra_body=extra, temperature=0.0
    )
    if stream:
        return "".join(c.choices[0].text for c in out if c.choices)
    return out.choices[0].text


def test_routings_give_different_answers(expected):
    """The memories change the completions, so the load test below can see cross-talk.
    (On this random model they leave the chat answers alike: chats are checked for equality
    with generate, not used to detect cross-talk.)"""
    for p in PROMPTS:
        answers = {r: expected[(r, p, False)] for r in ROUTINGS}
        assert len(set(answers.values())) == 3, answers


def test_models_lists_the_model_and_its_memories(client, qwen_dir, memories):
    (model,) = client.models.list().data
    assert model.id == str(qwen_dir)
    listed = model.model_extra["memories"]
    assert [m["name"] for m in listed] == ["med", "law"]
    assert [m["file"] for m in listed] == [str(memories["med"]), str(memories["law"])]
    assert model.model_extra["default_memory"] == "med"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_answers_equal_generate(client, qwen_dir, expected, chat, stream):
    prompt = PROMPTS[0]
    for routing in ROUTINGS:
        got = ask(client, str(qwen_dir), routing, prompt, chat, stream)
        assert got == expected[(routing, prompt, chat)], routing
    # no memory field: the command line's default (the first --memory)
    assert (
        ask(client, "default_model", None, prompt, chat, stream) == expected[("med", prompt, chat)]
    )


def test_bad_requests_are_400s_that_say_why(client, qwen_dir):
    cases = {
        "unknown memory 'legal'; available: none, med, law": {"memory": "legal"},
        "knn_k needs a memory; this request uses none": {"memory": "none", "knn_k": 2},
        "knn_k must be an integer, got '2'": {"memory": "med", "knn_k": "2"},
        "mix must be one of": {"memory": "med", "mix": "blend"},
        "expected entropy:T or margin:T": {"memory": "med", "skip_confident": "entropy"},
    }
    for message, extra in cases.items():
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=str(qwen_dir), prompt="Hi", extra_body=extra)
        assert err.value.status_code == 400 and message in str(err.value.body), extra


def test_a_model_that_fails_to_load_leaves_the_server_serving(client, qwen_dir, expected):
    with pytest.raises(openai.APIStatusError):
        client.completions.create(
            model="/no/such/model", prompt="Hi", extra_body={"memory": "none"}
        )
    got = client.completions.create(model=str(qwen_dir), prompt=PROMPTS[0], extra_body={})
    assert got.choices[0].text == expected[("med", PROMPTS[0], False)]


def test_request_settings_change_the_routing(client, qwen_dir, expected):
    prompt = PROMPTS[0]
    off = {"memory": "med", "lambda_scale": 0.0}
    got = client.completions.create(model=str(qwen_dir), prompt=prompt, extra_body=off)
    assert got.choices[0].text == expected[("none", prompt, False)]  # lambda 0: the plain model
    union = {"memory": "med", "mix": "union", "knn_k": 2, "skip_confident": "margin:0.99"}
    got = client.completions.create(model=str(qwen_dir), prompt=prompt, extra_body=union)
    assert got.choices[0].text  # served (settings parsed and applied without error)


def test_prompt_cache_entries_are_per_memory(client, qwen_dir):
    prompt = "Fever and cough: the patient presents with"  # shares no prefix with the others

    def cached(memory: str) -> int:
        out = client.completions.create(
            model=str(qwen_dir), prompt=prompt, max_tokens=2, extra_body={"memory": memory}
        )
        details = out.usage.prompt_tokens_details
        return details.cached_tokens if details else 0

    assert cached("law") == 0
    assert cached("law") > 0  # the same prompt and memory again: its prefix is reused
    assert cached("med") == 0  # never a prefix computed under another memory
    assert cached("none") == 0


def test_concurrent_load_alternating_memories(client, qwen_dir, expected):
    # routing, prompt, chat=False, streamed or not; every routing meets every prompt
    jobs = [(ROUTINGS[i % 3], PROMPTS[(i // 3) % 3], False, i % 4 == 3) for i in range(54)]

    def run(job):
        routing, prompt, chat, stream = job
        return ask(client, str(qwen_dir), routing, prompt, chat, stream)

    tic = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(run, jobs))
    seconds = time.perf_counter() - tic
    wrong = [(job, got) for job, got in zip(jobs, answers) if got != expected[job[:3]]]
    assert not wrong, wrong[:3]
    print(f"{len(jobs)} requests, 4 at a time: {len(jobs) / seconds:.1f} requests/s")
