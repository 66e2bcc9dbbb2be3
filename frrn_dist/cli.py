"""What the launchers (launch/evaluate.py, predict.py, export.py) share: argument types and flags, the one-line
exit on bad input, and (every launcher, train.py and compare.py too) the exit without a final garbage collection.

May import: frrn_dist.tta (its constants); nothing that loads a model or data.

Imports: frrn_dist.tta.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

from frrn_dist.tta import RESIZE_MODES


def parse_hw(text: str) -> tuple[int, int]:
    """'256x512' -> (256, 512), i.e. (height, width); ValueError naming the text otherwise."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise ValueError(f"{text!r} is not HxW (e.g. 256x512)")


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser raising ValueError: argparse then prints usage and the one message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__  # argparse names the type in its messages
    return convert


hw = _argument_type(parse_hw)


def make_parser(description: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose --help ends with the launcher's docstring (its examples), line breaks kept."""
    return argparse.ArgumentParser(
        description=description, epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, a tag dir or a .safetensors")


def add_input_hw(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--input-hw", type=hw, help=help)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if visible")


def add_views(p: argparse.ArgumentParser, resize_help: str, resize_default: str | None) -> None:
    """--resize and the test-time augmentation views (--scales, --flip)."""
    p.add_argument("--resize", choices=RESIZE_MODES, default=resize_default, help=resize_help)
    # checked with the model (tta.make_views), so a bad value exits with one line naming it, not argparse's usage
    p.add_argument("--scales", metavar="S1,S2,...",
                   help="test-time augmentation: factors of the input size (e.g. 0.75,1.0,1.25), each side rounded "
                   "to the architecture's multiple (16 A, 32 B); class probabilities averaged over the views at "
                   "full size (default: 1.0 only)")  # fmt: skip
    p.add_argument("--flip", action="store_true", help="test-time augmentation: also every view mirrored left-right")


def run_command(name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs); bad input (a ValueError) exits non-zero with one line `name: message`, no traceback."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise SystemExit(f"{name}: {e}") from None


def skip_gc_at_exit() -> None:
    """Call last in a launcher: the interpreter's exit then skips garbage-collecting the millions of objects that
    torch, DeepSpeed and wandb imported (the process is ending; nothing of theirs needs freeing). Measured on the
    2-core EPYC: a training rank's exit took 2.2 s, 0.3 s with this. atexit handlers still run (wandb, logging)."""
    gc.freeze()
