"""`esp-run`: the flags, and the commands serve (the default, in `esp.cli.serve`), generate,
profile, policies and bench (`esp.cli.bench`). Every error a user can cause ends in one line
`esp-run: error: ...` on stderr and a non-zero exit; Ctrl-C never prints a traceback."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys

from esp.cli.logs import LEVELS, setup_logging
from esp.engine.config import EngineConfig
from esp.engine.errors import EngineError
from esp.engine.generation_defaults import GenerationDefaults, defaults_of
from esp.engine.sampling_params import SamplingParams
from esp.engine.slo import ServiceSLO

COMMANDS = ("serve", "generate", "profile", "policies", "bench")


class CLIError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """Bad flags give one line on stderr and exit code 2."""

    def error(self, message: str) -> None:
        raise CLIError(message)


def run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def flag_type(convert, ok, what: str):
    """An argparse type: `convert(text)` must succeed and satisfy `ok`, else one line naming `what`."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


positive_number = flag_type(float, lambda v: 0 < v < math.inf, "a positive number")
#: milliseconds on the command line, seconds in the config
milliseconds = flag_type(lambda t: float(t) / 1e3, lambda v: 0 <= v < math.inf, "a non-negative number of milliseconds")
positive_milliseconds = flag_type(lambda t: float(t) / 1e3, lambda v: 0 < v < math.inf,
                                  "a positive number of milliseconds")


def count_or_none(text: str) -> int | None:
    """A positive integer, or `none` for no limit."""
    if text.strip().lower() in ("none", "unbounded", "unlimited"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or none, got {text}")
    return value


def policy_option(text: str) -> tuple[str, object]:
    """`KEY=VALUE`; the value is read as JSON when it parses (numbers, true/false, null), else
    kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def on_off(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {text}")
    return value in ("on", "true", "1", "yes")


def add_log_flags(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--log-level", type=str.lower, choices=LEVELS, default=default,
                   help=f"stderr log level (default {default})")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--policy", default="loong", help="policy bundle (see `esp-run policies`)")
    g.add_argument("--scheduling", help="override the bundle's scheduling policy")
    g.add_argument("--batching", help="override the bundle's batching policy")
    g.add_argument("--scaling", help="override the bundle's scaling policy")
    g.add_argument("--model", help="Hugging Face style model directory (default: bundled esp-tiny)")
    g.add_argument("--instances", type=positive_int, default=1, help="elastic instances (one process each)")
    g.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel processes (GPUs) per instance; "
                                                              "must divide the model's attention heads")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument("--dtype", choices=("auto", "float32", "float64", "bfloat16", "float16"), default="auto")
    g.add_argument("--kv-tokens-per-instance", type=positive_int, help="KV pool size (default: from free memory)")
    g.add_argument("--threads-per-instance", type=positive_int,
                   help="CPU threads per worker process (default: cores / (instances x tp))")
    g.add_argument("--policy-option", type=policy_option, action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the bundle's policies (repeatable), e.g. loong's max_prefill_s=2.5, "
                        "order=fcfs, preempt=always, tpot_target_s=0.1, consolidate=false, scale_up=false")
    g.add_argument("--max-prefill-tokens", type=positive_int, default=16384)
    g.add_argument("--max-batch-size", type=positive_int, default=256)
    g.add_argument("--prefill-instances", type=positive_int, help="disagg: instances that only prefill")
    g.add_argument("--decode-instances", type=positive_int, help="disagg: instances that only decode")
    g.add_argument("--decode-steps", type=positive_int, default=EngineConfig.decode_steps,
                   help="most decode iterations per scheduling round; a round ends early when a request arrives "
                        f"or ends (default {EngineConfig.decode_steps})")
    g.add_argument("--chunk-size", type=positive_int, help="chunked: tokens per step, decodes plus prompt chunks "
                                                           "(default 2048)")
    g.add_argument("--max-waiting-requests", type=count_or_none, default=512, metavar="N",
                   help="queued requests beyond which new ones are refused with 503 (default 512; none: no limit)")
    g.add_argument("--max-waiting-tokens", type=count_or_none, metavar="N",
                   help="queued prompt tokens beyond which new requests are refused with 503 "
                        "(default: 4x the KV slots of all instances)")
    g.add_argument("--log-requests", type=on_off, default=True, metavar="on|off",
                   help="one log line per finished request on esp.requests (default on)")
    t = p.add_argument_group("service SLO", "latency targets for requests that bring no slo of their own: "
                                            "schedulers aim for them, and responses report whether they were met")
    t.add_argument("--target-ttft-scale", type=positive_number, metavar="X",
                   help="TTFT target: X times the predicted prefill of the prompt alone on one instance "
                        "(default: none)")
    t.add_argument("--target-ttft-floor-ms", type=milliseconds, default=0.0, metavar="MS",
                   help="the least TTFT target; without --target-ttft-scale, the target (default 0: none)")
    t.add_argument("--target-tpot-ms", type=positive_milliseconds, metavar="MS", help="TPOT target (default: none)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    split = {k: getattr(args, k) for k in ("prefill_instances", "decode_instances") if getattr(args, k)}
    options = dict(args.policy_option) | split
    if sum(split.values()) > args.instances:
        raise CLIError(f"--prefill-instances plus --decode-instances exceed --instances {args.instances}")
    return EngineConfig(
        model=args.model, instances=args.instances, tp=args.tp, device=args.device, dtype=args.dtype,
        kv_tokens_per_instance=args.kv_tokens_per_instance, threads_per_instance=args.threads_per_instance,
        policy=args.policy, scheduling=args.scheduling, batching=args.batching, scaling=args.scaling,
        max_prefill_tokens=args.max_prefill_tokens, max_batch_size=args.max_batch_size, decode_steps=args.decode_steps,
        policy_options=options | ({"chunk_size": args.chunk_size} if args.chunk_size else {}),
        max_waiting_requests=args.max_waiting_requests, max_waiting_tokens=args.max_waiting_tokens,
        log_requests=args.log_requests, slo=service_slo(args))


def service_slo(args: argparse.Namespace) -> ServiceSLO | None:
    if args.target_ttft_scale is None and not args.target_ttft_floor_ms and args.target_tpot_ms is None:
        return None
    return ServiceSLO(args.target_ttft_scale, args.target_ttft_floor_ms, args.target_tpot_ms)


def build_parser() -> Parser:
    parser = Parser(prog="esp-run", description="Long-context LLM serving with elastic sequence parallelism.")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    from esp.cli.serve import add_serve_flags
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (default)")
    add_engine_flags(serve)
    add_serve_flags(serve)
    add_log_flags(serve, "info")
    gen = sub.add_parser("generate", help="complete one prompt and print it")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids, used verbatim")
    gen.add_argument("--max-tokens", type=positive_int, default=64)
    gen.add_argument("--temperature", type=float,
                     help="0 is greedy (default: the model's generation_config.json value, else 0)")
    gen.add_argument("--top-p", type=float, help="default: the model's generation_config.json value, else 1")
    gen.add_argument("--top-k", type=int, help="default: the model's generation_config.json value, else 0")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_flags(gen)
    add_log_flags(gen, "warning")
    prof = sub.add_parser("profile", help="measure step times on the workers and fit a cost-model profile")
    prof.add_argument("--out", required=True, help="where to write the profile (JSON, for CostModel.load)")
    prof.add_argument("--quick", action="store_true", help="few points, 1 repeat, max-len 1024 (about a minute)")
    prof.add_argument("--max-len", type=positive_int, help="longest prompt measured (default: min(8192, pool, "
                                                           "model context))")
    prof.add_argument("--repeats", type=positive_int, help="timings per point, median taken (default 2, quick 1)")
    add_engine_flags(prof)
    add_log_flags(prof, "info")
    sub.add_parser("policies", help="list installed policies by kind")
    from esp.cli.bench.runner import add_bench_flags
    bench = sub.add_parser("bench", help="benchmark policies x request rates on a trace (DESIGN 8)")
    add_engine_flags(bench)
    add_bench_flags(bench)
    add_log_flags(bench, "warning")
    return parser


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise CLIError(f"--prompt-ids must be comma-separated integers, got {text[:40]!r}") from None
    if not ids:
        raise CLIError("--prompt-ids is empty")
    return ids


def generate_params(args: argparse.Namespace, defaults: GenerationDefaults) -> SamplingParams:
    """The sampling flags given; for those left out, the model's `defaults`, else greedy."""
    if defaults.temperature is None:
        defaults = dataclasses.replace(defaults, temperature=0.0)
    return defaults.sampling_params(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                    top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
                                    stop=tuple(args.stop))


async def cmd_generate(args: argparse.Namespace) -> int:
    from esp.engine.engine import Engine

    generate_params(args, GenerationDefaults())  # wrong flags fail before the model loads
    prompt = parse_prompt_ids(args.prompt_ids) if args.prompt_ids else args.prompt
    async with Engine(engine_config(args)) as engine:
        params = generate_params(args, defaults_of(engine.tokenizer))
        final = None
        async for out in engine.generate(prompt, params):
            if not args.json:
                print(out.new_text, end="", flush=True)
            final = out
    if args.json:
        print(json.dumps({
            "text": final.text, "token_ids": final.token_ids, "finish_reason": final.finish_reason,
            "usage": {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens},
            "timing": vars(final.timing), "esp": final.esp, "error": final.error}))
    else:
        print()
    return 0 if final.finish_reason != "error" else 1


async def cmd_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from esp.engine.profiler import ProfileOptions, Profiler, summary_lines

    config = engine_config(args)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CLIError(f"--out: directory {str(out.parent)!r} does not exist")
    data, report = await Profiler(config, ProfileOptions(args.quick, args.max_len, args.repeats)).run()
    out.write_text(json.dumps(data, indent=1) + "\n")
    for line in summary_lines(report):
        print(line)
    print(f"wrote {out}")
    return 0


def cmd_policies() -> int:
    from esp.policies import available

    by_kind: dict[str, list] = {}
    for reg in available():
        by_kind.setdefault(reg.kind, []).append(reg)
    titles = {"policies": "bundles (--policy)", "scheduling": "scheduling (--scheduling)",
              "batching": "batching (--batching)", "scaling": "scaling (--scaling)"}
    for kind, title in titles.items():
        print(f"{title}:")
        for reg in by_kind.get(kind, []):
            print(f"  {reg.name:<16} {reg.target}")
    return 0


def one_line(err: BaseException) -> str:
    """The error's message on one line (an OSError with its file name)."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + "".join(f": {f}" for f in (err.filename, err.filename2) if f)
    else:
        text = str(err)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


def preflight(args: argparse.Namespace) -> None:
    """What can be checked before anything loads: `--model` and `--device cuda`."""
    from esp.cli.preflight import PreflightError, check_device, check_model_dir

    if args.command == "bench" and getattr(args, "url", None):
        return
    sim = getattr(args, "backend", "real") == "sim"
    try:
        check_model_dir(args.model, weights=not sim)
        if not sim:
            check_device(args.device, args.instances)
    except PreflightError as err:
        raise CLIError(str(err)) from None


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "policies":
        return cmd_policies()
    preflight(args)
    if args.command == "bench":
        from esp.cli.bench.runner import cmd_bench
        return cmd_bench(args)
    if args.command == "generate":
        return run_async(cmd_generate(args))
    if args.command == "profile":
        return run_async(cmd_profile(args))
    from esp.cli.serve import cmd_serve
    return cmd_serve(args, engine_config(args))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    try:
        args = build_parser().parse_args(argv)
        setup_logging(getattr(args, "log_level", "warning"))
        return dispatch(args)
    except CLIError as err:
        print(f"esp-run: error: {one_line(err)}", file=sys.stderr)
        return 2
    except (EngineError, ValueError, OSError) as err:
        # bad settings, a model that does not load, a port in use, a worker that failed to start, ...
        print(f"esp-run: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("esp-run: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run the imported module's main, so `except CLIError` also catches what esp.cli.bench raises
    from esp.cli.main import main as _main
    sys.exit(_main())
