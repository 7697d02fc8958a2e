"""mlx-lm's OpenAI-compatible server (``mlx_lm.server``) with memories chosen per request.

mlx-lm's generation thread takes requests from a queue and batches a request with the
running batch only when its model description equals the batch's; otherwise it lets the
batch finish, then asks its model provider for the next request's model. Here the routing a
request asks for travels inside its model name (``RoutedModelName``), so:

- a batch only ever holds requests with the same memory and settings (a request with other
  routing waits for the running batch to finish: different memories are served one batch
  after another, never mixed);
- the provider (``MemoryModelProvider``) switches the routers to the next batch's memory
  (no reload: the model and every memory's tables stay in memory), and keys mlx-lm's prompt
  cache by the routing too, so a prefix computed under one memory is never reused under
  another.

The handler (``MemoryAPIHandler``) reads the request's ``memory``, ``knn_k``, ``mix``,
``lambda_scale`` and ``skip_confident`` fields (a bad one is a 400 naming what is available)
and lists the memories under ``GET /v1/models``.
"""

from __future__ import annotations

import argparse
import json
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START
from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.server import APIHandler, ModelProvider, ResponseGenerator

from .memory_bank import MemoryBank, RoutingChoice

DEFAULT_MODEL = "default_model"  # mlx-lm's name for the model given on the command line


class RoutedModelName(str):
    """The model name a request gives, carrying the routing it asks for; equal to another
    name only when the routing is equal too."""

    choice: RoutingChoice

    def __new__(cls, name: str, choice: RoutingChoice):
        obj = super().__new__(cls, name)
        obj.choice = choice
        return obj

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, str)
            and str(self) == str(other)
            and self.choice == getattr(other, "choice", None)
        )

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((str(self), self.choice))

    def __reduce__(self):
        return RoutedModelName, (str(self), self.choice)


class MemoryModelProvider(ModelProvider):
    """mlx-lm's model provider that also sets the routing of the model it hands out.

    ``ready`` is set once the default model is loaded and every memory is prepared for it;
    ``error`` then holds what went wrong, if anything."""

    def __init__(self, cli_args: argparse.Namespace, bank: MemoryBank):
        super().__init__(cli_args)
        self.bank = bank
        self.ready = threading.Event()
        self.error: Exception | None = None
        self._loaded_key = None  # mlx-lm's own key of the loaded model

    def reset(self) -> None:  # mlx-lm calls it in the generation thread before (re)loading
        super().reset()
        self.bank.release()

    def load_default(self) -> None:
        try:
            super().load_default()
            self.bank.prepare(self.model)
        except Exception as e:  # reported by whoever waits on ready (start_server raises it)
            self.error = e
        finally:
            self.ready.set()

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        choice = getattr(model_path, "choice", self.bank.default)
        name = str(model_path)
        if name == self.cli_args.model:  # the id /v1/models lists: the command line's model
            name = DEFAULT_MODEL
        # mlx-lm reloads only when its own key changes (none known while a load may fail)
        self.model_key, self._loaded_key = self._loaded_key, None
        model, tokenizer = super().load(name, adapter_path, draft_model_path)
        self._loaded_key = self.model_key
        self.bank.select(model, choice)
        self.model_key = (*self._loaded_key, choice)  # prompt-cache entries per routing
        return model, tokenizer


class MemoryAPIHandler(APIHandler):
    """mlx-lm's request handler plus the per-request routing fields and the memory list."""

    @property
    def bank(self) -> MemoryBank:
        return self.response_generator.model_provider.bank

    def validate_model_parameters(self) -> None:
        super().validate_model_parameters()  # a ValueError here is mlx-lm's 400 reply
        self.requested_model = RoutedModelName(self.requested_model, self.bank.choice(self.body))

    def handle_models_request(self) -> None:
        cli = self.response_generator.cli_args
        model = {"id": cli.model, "object": "model", "created": self.created}
        model.update(owned_by="mlx_knnmoe", memories=self.bank.describe())
        model["default_memory"] = self.bank.default.memory or "none"
        body = json.dumps({"object": "list", "data": [model]}).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


def server_args(model: str, **settings) -> argparse.Namespace:
    """The settings mlx-lm's server objects read (``mlx_lm.server``'s flags), from ``settings``
    and mlx-lm's defaults. No draft model, KV quantisation or pipelining here."""
    args = dict(
        model=model,
        adapter_path=None,
        draft_model=None,
        num_draft_tokens=3,
        trust_remote_code=False,
        chat_template="",
        use_default_chat_template=False,
        chat_template_args={},
        temp=0.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        max_tokens=512,
        allowed_origins=["*"],
        decode_concurrency=32,
        prompt_concurrency=8,
        prefill_step_size=2048,
        prompt_cache_size=10,
        prompt_cache_bytes=None,
        kv_bits=None,
        kv_group_size=64,
        quantized_kv_start=DEFAULT_QUANTIZED_KV_START,
        pipeline=False,
    )
    unknown = set(settings) - set(args)
    if unknown:
        raise ValueError(f"unknown server settings: {', '.join(sorted(unknown))}")
    return argparse.Namespace(**{**args, **settings})


@dataclass
class RunningServer:
    httpd: ThreadingHTTPServer
    generator: ResponseGenerator
    thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def wait(self) -> None:
        """Serve until interrupted (Ctrl-C), then shut down."""
        try:
            while self.thread.is_alive():
                self.thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.generator.stop_and_join()


def start_server(
    args: argparse.Namespace, bank: MemoryBank | None, host: str = "127.0.0.1", port: int = 0
) -> RunningServer:
    """Start serving in background threads (port 0: a free one); returns once the model is
    loaded. ``bank`` None: plain ``mlx_lm.server`` (for comparisons)."""
    if bank is None:
        provider, handler = ModelProvider(args), APIHandler
    else:
        provider, handler = MemoryModelProvider(args, bank), MemoryAPIHandler
    generator = ResponseGenerator(provider, LRUPromptCache(args.prompt_cache_size))
    if bank is not None:
        provider.ready.wait()
        if provider.error is not None:
            generator.stop_and_join()
            raise provider.error
    httpd = ThreadingHTTPServer((host, port), lambda *a, **kw: handler(generator, *a, **kw))
    thread = threading.Thread(target=httpd.serve_forever, name="mlx_knnmoe.server", daemon=True)
    thread.start()
    return RunningServer(httpd, generator, thread)
