"""``segment_bucket.py``: segment every image under a URI with DeepLab (+dense CRF) on Ray Data.

Run with no arguments for the embedded demo (local Ray, bundled bucket and checkpoint).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from typing import NoReturn

from pipeline.config.flags import add_flags, values_from
from pipeline.config.sections import JobConfig
from pipeline.dag.cluster import stderr_without
from pipeline.dag.runner import SystemicFailure
from pipeline.demo import DEMO_BUCKET
from pipeline.io.credentials import public_text, refused_options
from pipeline.job import JOB_ERRORS, dry_run, regression_exit, run
from pipeline.models import DEFAULT_MODEL

# Argument groups of --help, in order ("" is the parser's own options); each config class names its group.
GROUPS = {
    "": None,
    "model": "model",
    "inference": "inference",
    "crf": "dense CRF (defaults: DeepLab v2's published values)",
    "compute": "compute",
    "run": "run",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones: their help says what happens when the option is unset."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Every field of JobConfig and its sections, as declared there (pipeline/config/sections.py)."""
    p = argparse.ArgumentParser(
        prog="segment_bucket.py",
        description=__doc__,
        formatter_class=_HelpFormatter,
        epilog="Outputs: OUTPUT/run=<run_id>/{masks/,errors/,classes.parquet,manifest.json,_SUCCESS}. "
        "Credentials come from the standard AWS/GCS environment and are never printed.",
    )
    groups = {name: p.add_argument_group(title) if title else p for name, title in GROUPS.items()}
    add_flags(p, groups, JobConfig)
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> JobConfig:
    """The JobConfig the parsed flags describe, with the demo's defaults when no INPUT_URI is given.

    A value outside its field's declared bounds exits 2 with the field's own message."""
    try:
        values = values_from(args, JobConfig)  # builds the sections, which check their own fields
        _check_cli(values, parser)
        if values["input_uri"] is None:  # the demo
            values.update(
                input_uri=str(DEMO_BUCKET / "images"), labels_uri=values["labels_uri"] or str(DEMO_BUCKET / "labels")
            )
        values["output_uri"] = values["output_uri"] or "outputs"
        values["model"] = values["model"] or DEFAULT_MODEL
        values["run_id"] = values["run_id"] or dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
        return JobConfig(**values)
    except ValueError as exc:
        parser.error(str(exc))


def _check_cli(values: dict, parser: argparse.ArgumentParser) -> None:
    """What only the command line can get wrong: a missing --output, --resume without --run-id, credentials."""
    if values["input_uri"] is not None and not values["output_uri"]:
        parser.error("--output is required when INPUT_URI is given")
    if values["resume"] and not values["run_id"]:
        parser.error("--resume needs the --run-id of the run to continue")
    refused = refused_options(values["storage_options"])
    if refused:  # an allow-list: names nobody reviewed may carry credentials too (docs/security.md)
        parser.error(
            f"--storage-options may only hold options known to carry no credentials; refused: "
            f"{', '.join(refused)}. The command line is visible to `ps` and Ray records it as the "
            "job's entrypoint; take credentials from a mounted credentials file, IRSA / workload "
            "identity, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from a Kubernetes Secret"
        )


def _uris(config: JobConfig) -> list[str | None]:
    return [config.input_uri, config.output_uri, config.labels_uri, config.weights_uri, config.pushgateway]


def drop_empty(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` without the flags given an empty value (``--weights ""``, ``--weights=``) or an empty
    INPUT_URI: an empty value is an unset one, as a ConfigMap key left "" means (k8s/configmap.yaml)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        action = parser._option_string_actions.get(name) if arg.startswith("--") else None
        if action is not None and eq and value == "":
            i += 1
        elif action is not None and not eq and action.nargs != 0 and i + 1 < len(argv) and argv[i + 1] == "":
            i += 2
        elif arg == "":
            i += 1
        else:
            out.append(arg)
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = drop_empty(sys.argv[1:] if argv is None else list(argv), parser)
    config = config_from_args(parser.parse_args(args), parser)
    try:
        if config.dry_run:
            dry_run(config)
            return 0
        summary = run(config)
    except JOB_ERRORS as exc:
        print(f"segment_bucket.py: error: {public_text(str(exc), _uris(config))}", file=sys.stderr)
        return 2
    except SystemicFailure as exc:
        print(f"segment_bucket.py: error: {exc}", file=sys.stderr)
        return 1
    return regression_exit(config, summary)


def script() -> NoReturn:
    """The command (``segment-bucket``, ``jobs/segment_bucket.py``): ``main()``, Ray shut down, then
    the process ends without the interpreter's teardown: with torch loaded that takes seconds, and
    the run is committed and its output flushed by then (benchmarks/ceiling.py, 'last result → exit')."""
    with stderr_without():
        code = main()
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        logging.shutdown()
        sys.stdout.flush()
    os._exit(code)
