"""`lmforge serve`: the OpenAI-compatible HTTP server (lmforge/serve/)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from lmforge.cli import command
from lmforge.commands.flags import Options, add_options
from lmforge.generate.engine import EngineConfig
from lmforge.loading import LoadOptions
from lmforge.serve.config import API_KEY_ENV, ServeConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or run directory (with its tokenizer)")
    add_options(p, LoadOptions)
    add_options(p, ServeConfig, title="server options")
    add_options(p, EngineConfig, title="engine options")


@command("serve", "an OpenAI-compatible HTTP server (completions, chat, streaming, metrics)", _serve_args)
def run_serve(args: argparse.Namespace) -> int:
    from lmforge.serve.extra import require_serve_extra

    require_serve_extra()
    from lmforge.serve.server import serve

    options = Options(args)
    config = options.build(ServeConfig)
    if config.api_key is None and os.environ.get(API_KEY_ENV):
        config = dataclasses.replace(config, api_key=os.environ[API_KEY_ENV])
    if config.host not in LOOPBACK and config.api_key is None:
        print(
            f"lmforge serve: warning: listening on {config.host} without an API key (--api-key or "
            f"${API_KEY_ENV}): anyone who can reach this port can use the model",
            file=sys.stderr,
        )
    serve(args.model, config, options.build(EngineConfig), dtype=options.build(LoadOptions).dtype)
    return 0
