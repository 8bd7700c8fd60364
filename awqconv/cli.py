"""The ``awqconv`` command line: parse options, call the API, map errors to exit codes.

Options default to None and inherit their defaults from QuantConfig, so the CLI and the Python
API cannot drift. Every error prints one ``error:`` line: exit 2 for bad usage (click's own and
UsageError), 1 for everything else; SIGTERM unwinds like Ctrl-C so no temporary directory is left.
Only this module prints or exits.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .config import QuantConfig
from .errors import AwqconvError, UsageError

_DEFAULTS = QuantConfig()


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so every ``finally`` and staging cleanup runs."""


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated()


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One ``error:`` line and exit 2 (usage) or 1 (anything else); never a traceback for a
    user's mistake or the machine's state (disk full, permissions). An unexpected exception is
    an awqconv bug: one line too, with the traceback under -v."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except AwqconvError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:
            click.echo(f"error: {_os_error(e)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated; nothing was written", err=True)
            sys.exit(143)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - a bug of ours: one line, the traceback with -v
            os_err = _wrapped_os_error(e)
            if os_err is not None:  # safetensors' writer reports I/O failures as its own error type
                click.echo(f"error: {_os_error(os_err)}", err=True)
                sys.exit(1)
            logging.getLogger("awqconv").debug("traceback", exc_info=True)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(f"error: internal error ({type(e).__name__}: {first}); rerun with -v to see the traceback "
                       "and please report it", err=True)
            sys.exit(1)

    return wrapper


def _wrapped_os_error(e: Exception) -> OSError | None:
    """The OSError behind a library's own exception whose message says ``(os error N)``."""
    m = re.search(r"os error (\d+)", str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


def _os_error(e: OSError) -> str:
    """An OSError as the file and the cause, with the fix for the usual ones."""
    where = f" ({e.filename})" if e.filename else ""
    hint = {
        errno.ENOSPC: "the disk is full; free some space or write elsewhere with -o (nothing was left behind)",
        errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere with -o",
        errno.EACCES: "permission denied; choose a location you can write to",
        errno.EPERM: "operation not permitted; choose a location you can write to",
        errno.EROFS: "the file system is read-only; choose another location",
        errno.ENAMETOOLONG: "a file name is too long; choose a shorter -o",
        errno.ENOTDIR: "a part of the path is a file, not a directory",
        errno.ELOOP: "a symbolic link in the path points back at itself",
    }.get(e.errno, e.strerror or str(e))
    return f"{hint}{where}"


def _search_tokens(text: str | None) -> Any:
    if text is None:
        return None
    if text.lower() == "all":
        return "all"
    try:
        v = int(text)
    except ValueError:
        raise click.BadParameter("use a positive number of tokens or 'all'") from None
    if v <= 0:
        raise click.BadParameter("use a positive number of tokens or 'all'")
    return v


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="awqconv")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Quantize a Hugging Face causal LM with AWQ once; export, verify and publish 4-bit artifacts."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("model", required=False, default="builtin:smollm2-135m")
@click.option("--to", "to", default="canonical,hf-awq", show_default=True,
              help="Comma-separated formats: canonical, hf-awq, gguf[:type], exllamav2, peft, mlx, compressed-tensors.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory; each format goes to a sub-directory.")
@click.option("--method", type=click.Choice(["awq", "rtn"]), default=None, help=f"[default: {_DEFAULTS.method}]")
@click.option("--w-bit", type=click.IntRange(2, 8), default=None, help=f"Weight bits [default: {_DEFAULTS.w_bit}].")
@click.option("-g", "--group-size", type=int, default=None,
              help=f"Group size along the input dim, or -1 per channel [default: {_DEFAULTS.group_size}].")
@click.option("--zero-point/--symmetric", default=None, help="Asymmetric (default) or symmetric grid.")
@click.option("--duo-scaling/--no-duo-scaling", default=None, help="s = x^a / w^(1-a) (default) or x^a.")
@click.option("--scale-search/--no-scale-search", "search_scales", default=None, help="Activation-aware scale search (default on).")
@click.option("--clip/--no-clip", "apply_clip", default=None, help="Clip search (default on).")
@click.option("--gqa-vo/--no-gqa-vo", "smooth_gqa_vo", default=None, help="Smooth v_proj->o_proj under GQA (default on).")
@click.option("--n-grid", type=click.IntRange(2, 200), default=None, help=f"Scale-search grid size [default: {_DEFAULTS.n_grid}].")
@click.option("--calib", default=None,
              help="builtin (default), pileval, a .txt/.jsonl/.parquet file, or a Hugging Face dataset name.")
@click.option("--calib-samples", type=click.IntRange(1), default=None, help=f"Calibration blocks [default: {_DEFAULTS.calib_samples}].")
@click.option("--calib-seq-len", type=click.IntRange(8), default=None, help=f"Tokens per block [default: {_DEFAULTS.calib_seq_len}].")
@click.option("--text-column", default=None, help="Text column of a jsonl/parquet/dataset source [default: text].")
@click.option("--split", default=None, help="Dataset split [default: train].")
@click.option("--search-tokens", default=None,
              help=f"Tokens for the search loss, or 'all' [default: {_DEFAULTS.search_tokens}].")
@click.option("--scale-dtype", type=click.Choice(["float16", "bfloat16"]), default=None,
              help="Scale dtype [default: bf16 for bf16 models, else fp16].")
@click.option("--search-grid", default=None,
              help="Grid the search targets: int (the canonical grid, default) or gguf:<type>, e.g. gguf:q4_0.")
@click.option("--skip", "skip", multiple=True, help="Keep linears whose name contains this in full precision (repeatable).")
@click.option("--keep-prescaled", is_flag=True,
              help="Also store the AWQ-prescaled float weights in the canonical artifact (prescaled*.safetensors, "
                   "~2 bytes per weight), so a later export to gguf:q4_0 or a K-quant re-quantizes them instead of "
                   "the dequantized integers. Not needed for gguf targets of the same run.")
@click.option("--device", default=None, help="Compute device [default: cuda when present, else cpu].")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repository's own Python code to run.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run of the same command from its last finished layer (its checkpoints "
                   "are kept beside -o); the result is the same as an uninterrupted run's. Without checkpoints it "
                   "starts from the beginning.")
@click.option("--activation-memory", default=None, metavar="SIZE",
              help="Host memory for calibration activations, e.g. 4GB; the rest spill to disk beside -o "
                   "[default: half the available memory].")
@click.option("--dry-run", is_flag=True, help="Resolve mappings, check every constraint and free disk, print the plan; no calibration.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_fail_cleanly
def quantize(model: str, to: str, out_dir: Path, method, w_bit, group_size, zero_point, duo_scaling, search_scales, apply_clip,
             smooth_gqa_vo, n_grid, calib, calib_samples, calib_seq_len, text_column, split, search_tokens,
             scale_dtype, search_grid, skip, keep_prescaled, device, trust_remote_code, revision, overwrite, resume,
             activation_memory, dry_run, quiet) -> None:
    """Quantize MODEL (a local directory, a hub id, or builtin:smollm2-135m) and write formats."""
    from . import api

    st = _search_tokens(search_tokens)
    cfg = QuantConfig().with_overrides(
        method=method, w_bit=w_bit, group_size=group_size, zero_point=zero_point, duo_scaling=duo_scaling,
        search_scales=search_scales, apply_clip=apply_clip, smooth_gqa_vo=smooth_gqa_vo, n_grid=n_grid, calib=calib,
        calib_samples=calib_samples, calib_seq_len=calib_seq_len, calib_text_column=text_column,
        calib_split=split, scale_dtype=scale_dtype, search_tokens=None if st in (None, "all") else st,
        modules_to_not_convert=tuple(skip) or None,
    )
    if st == "all":
        from dataclasses import replace
        cfg = replace(cfg, search_tokens=None)
    if dry_run:
        p = api.plan(model, to, out_dir, cfg, overwrite=overwrite, trust_remote_code=trust_remote_code, revision=revision,
                     device=device, keep_prescaled=keep_prescaled)
        click.echo(p.describe())
        click.echo("dry run: all checks passed; nothing was calibrated or written")
        return
    budget = None
    if activation_memory is not None:
        from ._io import parse_size

        try:
            budget = parse_size(activation_memory)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--activation-memory") from None
    res = api.convert(model, to, out_dir, cfg, overwrite=overwrite, device=device,
                      trust_remote_code=trust_remote_code, revision=revision, progress=not quiet,
                      search_grid=search_grid, keep_prescaled=keep_prescaled, resume=resume,
                      activation_memory=budget)
    ratio = _mean_loss_ratio(res.model)
    click.echo(f"quantized {len(res.model.linears)} linears in {res.report.get('seconds_quantize')} s"
               + (f"; search kept {ratio:.1%} of the round-to-nearest loss" if ratio is not None else ""))
    for label, path in res.artifacts.items():
        click.echo(f"  {label:<12} {path}")


def _mean_loss_ratio(qm) -> float | None:
    recs = [r for r in qm.search.scales if r.loss_before > 0]
    if not recs:
        return None
    return sum(r.loss_after / r.loss_before for r in recs) / len(recs)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, help="Comma-separated formats to write.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A PEFT LoRA adapter trained on the peft layout.")
@click.option("--adapter-mode", type=click.Choice(["separate", "merge"]), default="separate", show_default=True,
              help="Keep the adapter beside each export, or merge it and re-quantize on the same grid (lossy).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when ARTIFACT is a Hub id.")
@_fail_cleanly
def export(artifact: Path, to: str, out_dir: Path, adapter, adapter_mode: str, overwrite: bool, revision) -> None:
    """Re-export ARTIFACT (canonical, hf-awq, peft, ..., or any AutoAWQ GEMM checkpoint, local or a
    Hub id) as other formats without re-quantizing."""
    from . import api

    written = api.export(artifact, to, out_dir, overwrite=overwrite, adapter=adapter, adapter_mode=adapter_mode,
                         revision=revision)
    for label, path in written.items():
        click.echo(f"  {label:<12} {path}")


@main.command(name="eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path), required=True,
              help="Held-out text file to measure perplexity on.")
@click.option("--seq-len", type=click.IntRange(16), default=512, show_default=True)
@click.option("--max-windows", type=click.IntRange(1), default=None)
@click.option("--device", default=None)
@_fail_cleanly
def eval_cmd(artifact: Path, text_file: Path, seq_len: int, max_windows, device) -> None:
    """Perplexity of ARTIFACT (or a float model directory) on a text file."""
    from . import api

    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--text {text_file} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    ppl = api.evaluate(artifact, text, seq_len=seq_len, max_windows=max_windows, device=device)
    click.echo(f"perplexity {ppl:.4f} ({artifact}, seq_len {seq_len})")


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--device", default=None)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write verify.json [default: DIRECTORY/verify.json].")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for torch (1 is often fastest for batch-1 decode on a busy machine).")
@click.option("--no-bench", is_flag=True, help="Skip the short benchmark.")
@_fail_cleanly
def verify(directory: Path, device, json_path, threads, no_bench: bool) -> None:
    """Load, round-trip, generate with and benchmark every artifact in DIRECTORY."""
    from .runtime.verify import verify as run_verify

    report = run_verify(directory, device=device, threads=threads, bench=not no_bench)
    click.echo(report.table())
    target = json_path or (directory / "verify.json" if directory.is_dir() else directory.with_suffix(".verify.json"))
    target.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    click.echo(f"wrote {target}")
    if not report.ok:
        click.echo("error: verification failed (see the table above)", err=True)
        sys.exit(1)


@main.command()
@click.argument("out_dir", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--repo", required=True, help="NAMESPACE/NAME: your user or organization, and the base name of the repos.")
@click.option("--layout", type=click.Choice(["repos", "branches"]), default="repos", show_default=True,
              help="One repo per format (named NAME-AWQ, NAME-GGUF, ...), or the one repo NAMESPACE/NAME "
                   "with a branch per format.")
@click.option("--revision", default=None,
              help="Branch to commit to (created from main when missing) [default: main]; with --layout branches, "
                   "the branch of the index card.")
@click.option("--private", is_flag=True, help="Create the repos (and the collection) private.")
@click.option("--collection", default=None, help="Also gather the repos in this Collection of NAMESPACE.")
@click.option("--only", default=None, help="Comma-separated artifacts of OUT to publish [default: all].")
@click.option("--name-template", "name_templates", multiple=True,
              help="LABEL=TEMPLATE overriding a repo name, e.g. exllamav2={name}-exl2 (repeatable).")
@click.option("--base-model", default=None, help="Hub id of the source model [default: the source, when it is a Hub id].")
@click.option("--license", "license_", default=None, help="License id for the cards [default: the source's, when known].")
@click.option("--quantized-by", default=None, help="quantized_by in the cards [default: NAMESPACE].")
@click.option("--force", is_flag=True, help="Publish artifacts that were never verified, failed or changed since (cards say so).")
@click.option("--dry-run", is_flag=True,
              help="Read the Hub and print the plan (repos, files, sizes, what is created or replaced); change nothing. "
                   "With --local-dir: the plan only, no network.")
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write exactly what would be uploaded, one folder per target repo, instead of uploading.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier --local-dir output.")
@click.option("--verify-json", "verify_json", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A verify record written elsewhere with `awqconv verify --json` (repeatable).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write what was published (repos, revisions, commits) as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_fail_cleanly
def publish(out_dir: Path, repo: str, layout: str, revision, private: bool, collection, only, name_templates,
            base_model, license_, quantized_by, force: bool, dry_run: bool, local_dir, overwrite: bool, verify_json,
            json_path, quiet: bool) -> None:
    """Publish every verified artifact of OUT to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`;
    endpoint: HF_ENDPOINT)."""
    from .publish import publish as run_publish

    try:
        res = run_publish(out_dir, repo, layout=layout, revision=revision, private=private, collection=collection,
                          only=[o.strip() for o in only.split(",") if o.strip()] if only else None,
                          name_templates=name_templates, base_model=base_model, license=license_,
                          quantized_by=quantized_by, force=force, dry_run=dry_run, local_dir=local_dir,
                          overwrite=overwrite, verify_json=verify_json, progress=not quiet, echo=click.echo)
    except (KeyboardInterrupt, Terminated) as e:
        # uploads may have started: say how to finish instead of "nothing was written"
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        click.echo(f"{stopped}; run the same command again to finish (files already sent are not sent again)", err=True)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    if json_path is not None:
        json_path.write_text(json.dumps(res.to_json(), indent=2) + "\n")


@main.command()
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
# the lists are parsed in the command body, not a click callback, so a bad value is awqconv's
# one-line usage error (exit 2) like every other one
@click.option("--batch-size", "batch_sizes", default="1", show_default=True,
              help="Comma-separated batch sizes, each >= 1.")
@click.option("--prefill", "prefill_lens", default="64", show_default=True,
              help="Comma-separated prompt lengths, each >= 1; prefill + decode must fit the model's context.")
@click.option("--decode", "decode_lens", default="64", show_default=True,
              help="Comma-separated numbers of generated tokens, each >= 1.")
@click.option("--compare-fp16", is_flag=True, help="Also benchmark the float (dequantized) model.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N [default: cuda when present, else cpu].")
@_fail_cleanly
def bench(artifact: Path, batch_sizes: str, prefill_lens: str, decode_lens: str, compare_fp16: bool, device) -> None:
    """AutoAWQ-style benchmark table for ARTIFACT on awqconv's runtime."""
    from .devices import resolve_device
    from .runtime.bench import bench as run_bench, format_table, parse_lengths

    dev = resolve_device(device)  # every option is checked before the model loads
    rows = run_bench(artifact, batch_sizes=parse_lengths(batch_sizes, "--batch-size"),
                     prefill_lens=parse_lengths(prefill_lens, "--prefill"),
                     decode_lens=parse_lengths(decode_lens, "--decode"), compare_fp16=compare_fp16, device=dev)
    click.echo(format_table(rows))


@main.command()
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
@click.option("--device", default=None, help="cpu, cuda or cuda:N [default: cuda when present, else cpu].")
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True)
@_fail_cleanly
def chat(artifact: Path, device, max_new_tokens: int) -> None:
    """Interactive streaming chat with ARTIFACT using its chat template.

    Replies stream as they are generated. End the session with /exit, /quit or Ctrl-D (EOF);
    /reset starts a new conversation."""
    from .devices import resolve_device
    from .runtime.chat import chat as run_chat, read_line, write_stream

    dev = resolve_device(device)
    try:
        # read_line reads stdin as bytes: a line that is not UTF-8 is reported and skipped
        run_chat(artifact, device=dev, max_new_tokens=max_new_tokens, input_fn=read_line, output_fn=write_stream)
    except KeyboardInterrupt:
        # Ctrl-C is a normal way out of a chat: end the half-written reply line, no "nothing was written"
        click.echo("")
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
