"""``mlx_knnmoe.chat``: a chat REPL with a kNN-MoE memory and commands to steer retrieval.

The conversation's tokens stay in one prompt cache: each turn feeds only what the cache has
not seen (the cache is trimmed back to the longest common prefix when the chat template
renders earlier turns differently). When the conversation outgrows ``--max-kv-size``, the
oldest turns are dropped and the cache is rebuilt, so memory stays bounded. A tokenizer
without a chat template (most base models) gets the turns as plain text, one per line.
"""

from __future__ import annotations

import sys

import click
import mlx.core as mx

from ..retrieval.attach import configure, knn_stats, set_stats
from .options import command, generation_options, has_chat_template, start_generation, stats_table

HELP = """commands:
  /memory on|off          retrieval on, or the plain router
  /k N                    neighbours per token
  /mix topk|union|logits  how memory and router combine
  /lambda X               confidence scale (0 turns retrieval off)
  /stats                  routing statistics of the last reply
  /reset                  start a new conversation
  /help                   this text
  /quit, Ctrl-D           leave
Ctrl-C stops a reply."""


class ChatSession:
    def __init__(self, model, tokenizer, system_prompt=None, max_kv_size=4096, **generation):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.max_kv_size = max_kv_size
        self.generation = generation  # max_tokens, sampler
        self.plain_text = not has_chat_template(tokenizer)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.reset_cache()

    def reset_cache(self) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)
        self.seen: list[int] = []  # the tokens whose keys and values are in the cache

    def _render(self) -> list[int]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        budget = self.max_kv_size - self.generation.get("max_tokens", 256)
        while True:
            tokens = self._tokens(system + self.messages)
            if len(tokens) <= budget or len(self.messages) <= 1:
                return list(tokens)
            self.messages = self.messages[2:]  # forget the oldest exchange

    def _tokens(self, messages: list[dict]) -> list[int]:
        if self.plain_text:  # as generate does: the text itself, special tokens as encode adds
            return self.tokenizer.encode(plain_conversation(messages))
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def reuse_cache(self, tokens: list[int]) -> list[int]:
        """Trim the cache to its common prefix with ``tokens``; return what is left to feed."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        common = 0
        for a, b in zip(self.seen, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # at least one token must be fed
        extra = len(self.seen) - common
        trimmable = can_trim_prompt_cache(self.cache)
        if extra and not (trimmable and trim_prompt_cache(self.cache, extra) == extra):
            self.reset_cache()
            common = 0
        self.seen = tokens[:common]
        return tokens[common:]

    def reply(self, text: str, write=print) -> str:
        """Generate the assistant's answer to ``text``, streaming it through ``write``."""
        from mlx_lm import stream_generate

        self.messages.append({"role": "user", "content": text})
        prompt = self._render()
        feed = self.reuse_cache(prompt)
        pieces, tokens = [], []
        try:
            for response in stream_generate(
                self.model,
                self.tokenizer,
                mx.array(feed),
                prompt_cache=self.cache,
                **self.generation,
            ):
                write(response.text)
                pieces.append(response.text)
                tokens.append(response.token)
        except KeyboardInterrupt:  # the cache may hold part of a step: rebuild it next turn
            self.reset_cache()
            write("\n[interrupted]")
        else:
            offset = getattr(self.cache[0], "offset", None)
            if isinstance(offset, int):
                self.seen = (prompt + tokens)[:offset]
            else:
                self.reset_cache()
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def plain_conversation(messages: list[dict]) -> str:
    """The turns as plain text, one per line, for a tokenizer without a chat template."""
    return "\n".join(m["content"] for m in messages)


def run_command(line: str, session: ChatSession, state: dict) -> str | None:
    """Execute a /command; return the text to print (None: leave)."""
    name, _, arg = line[1:].strip().partition(" ")
    arg = arg.strip()
    model = session.model
    if name in ("quit", "exit", "q"):
        return None
    if name == "help":
        return HELP
    if name == "reset":
        session.reset()
        return "new conversation"
    if name == "stats":
        stats = knn_stats(model)
        return stats_table(stats) if stats else "no memory attached"
    if state["config"] is None:
        return f"/{name}: no memory attached (start with --memory)"
    try:
        if name == "memory" and arg in ("on", "off"):
            scale = state["lambda_scale"] if arg == "on" else 0.0
            configure(model, lambda_scale=scale)
            return f"memory {arg}"
        if name == "k":
            return f"k = {configure(model, k=int(arg)).k}"
        if name == "mix":
            return f"mix = {configure(model, mix=arg).mix}"
        if name == "lambda":
            state["lambda_scale"] = configure(model, lambda_scale=float(arg)).lambda_scale
            return f"lambda scale = {state['lambda_scale']}"
    except ValueError as e:
        return f"/{name}: {e}"
    return f"unknown command {line.strip()!r}; /help lists them"


@command()
@generation_options(
    max_tokens=256,
    seed=0,
    max_kv_size=4096,
    kv_help="Tokens of conversation kept in the prompt cache; older turns are dropped.",
)
@click.option("--system-prompt", help="System prompt for the chat template.")
def cli(**kw) -> None:
    """Chat with a model and a kNN-MoE memory. /help lists the commands."""
    from mlx_lm.sample_utils import make_sampler

    try:
        import readline  # noqa: F401  (line editing for input())
    except ImportError:
        pass
    model, tokenizer, config = start_generation(kw)
    sampler = make_sampler(kw["temp"], kw["top_p"], kw["min_p"], top_k=kw["top_k"])
    session = ChatSession(
        model,
        tokenizer,
        kw["system_prompt"],
        kw["max_kv_size"],
        max_tokens=kw["max_tokens"],
        sampler=sampler,
    )
    state = {"config": config, "lambda_scale": config.lambda_scale if config else 1.0}
    memory = f" with memory {kw['memory']}" if config else ""
    if session.plain_text:
        click.echo(
            "note: the tokenizer has no chat template; turns are sent as plain text", err=True
        )
    click.echo(f"chatting with {kw['model']}{memory}. /help for commands, Ctrl-D to leave.")
    while True:
        try:
            line = input(">> ")
        except EOFError:
            click.echo("\nbye")
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            out = run_command(line, session, state)
            if out is None:
                click.echo("bye")
                return
            click.echo(out)
            continue
        if config is not None:
            set_stats(model)
        session.reply(line, write=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        click.echo()


main = cli

if __name__ == "__main__":
    main()
