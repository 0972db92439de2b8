"""compare: fine-tune plain LoRA, ShareLoRA and Bi-Share LoRA on one model and see what sharing buys.

Every method trains the same steps, on the same windows of the same text, from the same seed:

    lora                 plain LoRA at --r
    sharelora            ShareLoRA: the layers of each share set share A and B (sets found as `plan`
                         finds them at --eps, or those of --plan)
    sharelora_expanded   the same sets with the rank raised to floor(L/U r) (about LoRA's parameter count)
    bishare_slice        Bi-Share LoRA at the paper's ranks, Slice Sharing
    bishare_gate         Gate Transformation, its core shrunk to the model's dims
    bishare_kron         Kronecker Extension, d_s dividing every module dim

and reports, per method, the trainable parameters, the optimizer-state bytes (AdamW), the median step
time, the training loss (mean of the last tenth of the steps) and the loss on held-out text it never
trained on: by default the built-in fine-tuning task (unit conversions the built-in model never saw),
held out line by line, so no held-out line is a training line; with --text, its last --heldout
paragraphs. Writes into --out: compare.json (every figure, every loss; rewritten after each method,
so a Ctrl-C, once or more, at any moment keeps the finished ones) and compare.png (loss curves, and
trainable parameters against held-out loss), each time through a hidden temporary folder in --out, so
--out never mixes them with an earlier run's.

Every option, the model directory (a causal LM), the configs (they must fit) and --out are checked
before the model is loaded.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from pathlib import Path

from . import CommandError, Interrupted, counted, require_between, require_positive
from .compare_report import plot, table
from .fitting import add_adapter_arguments, bishare_configs, label, lora_config, parameter_count, target_modules
from .loading import (add_device_argument, check_weight_shapes, load_model, load_texts, load_tokenizer, max_positions,
                      model_skeleton, read_model_config, read_plan, resolve_device, resolve_model_dir)
from .outputs import RunOutputs, check_out_dir, write_json
from .options import (add_threads_argument, add_training_arguments, check_threads_argument, check_training_arguments,
                      check_training_fits, set_threads)

HELP = "fine-tune LoRA, ShareLoRA and Bi-Share LoRA alike and compare parameters, memory, time and held-out loss"
METHODS = ("lora", "sharelora", "sharelora_expanded", "bishare_slice", "bishare_gate", "bishare_kron")
OUTPUTS = ("compare.json", "compare.png")
CALIBRATION = {"max_length": 128, "position": "input", "batch_size": 16, "method": "complete"}  # plan's defaults;
# max_length: at most the model's maximum positions, as in plan
FOUND_DEFAULTS = {"eps": 0.85, "calibration_samples": 64}  # options of the share sets found, where no --plan gives them
EVAL_BATCH = 16  # held-out windows per forward pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="causal LM directory (default: the built-in tiny LLaMA)")
    p.add_argument("--steps", metavar="N", type=int, default=120, help="optimizer steps per method (default: 120)")
    p.add_argument("--methods", metavar="LIST", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--plan", metavar="FILE",
                   help="take the ShareLoRA share sets from this plan.json (default: find them on the built-in "
                        "corpus as `plan` does)")
    p.add_argument("--eps", metavar="EPS", type=float,
                   help=f"similarity threshold of the share sets found (default: {FOUND_DEFAULTS['eps']}; not with --plan)")
    p.add_argument("--calibration-samples", metavar="N", type=int,
                   help="paragraphs of the built-in corpus the share sets are found on (default: "
                        f"{FOUND_DEFAULTS['calibration_samples']}; not with --plan)")
    p.add_argument("--text", metavar="FILE",
                   help="training text file, paragraphs separated by blank lines; its last --heldout paragraphs "
                        "are held out (default: the built-in fine-tuning task)")
    p.add_argument("--heldout", metavar="N", type=int, default=32, help="held-out paragraphs (default: 32)")
    add_adapter_arguments(p)
    add_training_arguments(p)
    add_device_argument(p)
    add_threads_argument(p)
    p.add_argument("--out", metavar="DIR", default="sharelora_compare",
                   help="output folder (default: ./sharelora_compare)")


@dataclasses.dataclass
class Setup:
    """Everything `compare` checked and built before loading the model."""

    model_dir: Path
    model_config: object
    out: Path
    device: str
    methods: list[str]
    infos: list
    num_layers: int
    configs: dict  # method name -> ShareLoRAConfig (the ShareLoRA ones once the share sets are known)
    calibration: list[str] | None  # paragraphs to find the share sets on; None: they came from --plan
    tokenizer: object
    train_tokens: object
    heldout_tokens: object
    text_note: dict


def run(args: argparse.Namespace) -> dict:
    """Check everything, train every method, write compare.json and compare.png; returns the JSON content."""
    setup = _setup(args)
    from tqdm.auto import tqdm

    from ..benchmarks.environment import load_warning, loadavg
    from .training import Interrupts, heldout_loss

    threads = set_threads(args)
    machine = {"cpu_count": os.cpu_count(), "torch_threads": threads, "loadavg_before": loadavg(), "loadavg_after": None}
    base_model = load_model(setup.model_dir, causal_lm=True, device=setup.device)
    if setup.calibration is not None:
        setup.configs.update(_found_sharelora_configs(base_model, setup, args))
    sets = setup.configs["sharelora"].share_sets
    skipped = {m: f"no share set ({'in ' + args.plan if args.plan else f'at eps={args.eps}'}): the same adapters as lora"
               for m in ("sharelora", "sharelora_expanded") if m in setup.methods and not sets}
    methods = [m for m in setup.methods if m not in skipped]
    result = {
        "model": str(setup.model_dir), "model_type": setup.model_config.model_type, "device": setup.device,
        "steps": args.steps, "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "train_text": setup.text_note["train"], "heldout_text": setup.text_note["heldout"],
        "train_tokens": len(setup.train_tokens), "heldout_tokens": len(setup.heldout_tokens), "share_sets": sets,
        "share_sets_from": args.plan or f"similarity at eps={args.eps} on {counted(len(setup.calibration), 'paragraph')} "
                                        "of the built-in corpus",
        "base_heldout_loss": heldout_loss(base_model, setup.heldout_tokens, args.seq_len, setup.tokenizer.bos_token_id,
                                          EVAL_BATCH),
        "methods": {}, "skipped": skipped, "finished": False, "machine": machine,
    }
    print(f"{setup.model_dir} ({setup.model_config.model_type}): share sets {sets or 'none'}; held-out loss without "
          f"adapters {result['base_heldout_loss']:.4f}")
    outputs = RunOutputs(setup.out, OUTPUTS)
    outputs.check_space(64 * args.steps * len(methods) + 2**20)  # the losses in JSON, the figure

    def save(with_plot: bool) -> None:
        parts = [("compare.json", lambda path: write_json(path, result))]
        outputs.write(parts + [("compare.png", lambda path: plot(result, path))] if with_plot else parts)

    if not methods:  # every method skipped: the base's loss and the reasons
        save(with_plot=False)
    with Interrupts() as interrupts:  # from here on a Ctrl-C never costs a finished method
        with tqdm(total=len(methods) * args.steps, desc="compare") as bar:
            for name in methods:
                bar.set_description(f"compare: {name}")
                row = _train_method(base_model, setup.configs[name], setup, args, bar, interrupts)
                if row is not None:
                    result["methods"][name] = row
                    result["finished"] = len(result["methods"]) == len(methods)
                    machine["loadavg_after"] = loadavg()
                    save(with_plot=result["finished"])
                if interrupts.requested:
                    break
        del bar  # tqdm's __del__ runs here, where a Ctrl-C is recorded, not raised inside it
        if not interrupts.requested:
            print(table(result))
            warning = load_warning(machine)
            if warning:
                print(warning)
            print(f"wrote {setup.out / 'compare.json'}" + (f", {setup.out / 'compare.png'}" if methods else ""))
    if interrupts.requested:
        done = len(result["methods"])
        where = f"{setup.out / 'compare.json'} holds them" if done else "nothing written"
        raise Interrupted(f"interrupted after {counted(done, 'finished method')} of {len(methods)}; {where}")
    return result


def _note_plan_fields(plan, base, path: str) -> None:
    """A note on stdout naming the adapter fields of the plan that differ from this run's: compare takes
    only its share sets, and trains every method with the command line's rank, alpha and targets."""
    fields = ("r", "alpha", "use_rslora", "dropout", "target_modules")
    differ = [f"{f}={getattr(plan, f)!r}" for f in fields
              if getattr(plan, f) != getattr(base, f) and not (f == "target_modules" and getattr(plan, f) is None)]
    if differ:
        print(f"note: compare takes only the share sets of --plan {path}; its {', '.join(differ)} differ from this "
              "run's, which every method trains with (--r, --alpha, --target-modules)")


def _setup(args: argparse.Namespace) -> Setup:
    """Check every option, the model directory, the configs and --out, reading no weights; CommandError
    naming what is wrong."""
    from ..data import calibration_texts

    given = [f"--{name.replace('_', '-')}" for name in FOUND_DEFAULTS if getattr(args, name) is not None]
    if args.plan is not None and given:
        raise CommandError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to the share sets "
                           "compare finds, not to those of --plan")
    for name, default in FOUND_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    require_positive(args, "steps", "heldout", "calibration_samples", "r", "alpha")
    check_training_arguments(args)
    check_threads_argument(args)
    require_between(args, "eps", 0, 1)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        problem = f"unknown {unknown}" if unknown else "repeated names"
        raise CommandError(f"--methods: {problem}; known: {','.join(METHODS)}")
    plan = read_plan(Path(args.plan)) if args.plan else None
    planned_sets = plan.share_sets if plan is not None else None
    calibration = None
    if planned_sets is None:
        calibration = calibration_texts()[: args.calibration_samples]
        if len(calibration) < args.calibration_samples:
            raise CommandError(f"--calibration-samples {args.calibration_samples}: the built-in corpus holds "
                               f"{len(calibration)} paragraphs")
    model_dir = resolve_model_dir(args.model)
    model_config = read_model_config(model_dir, causal_lm=True)
    out = check_out_dir(args.out, OUTPUTS)
    train_texts, heldout_texts, text_note = _texts(args)
    device = resolve_device(args.device)
    check_training_fits(args, model_config, model_dir, device)
    skeleton = model_skeleton(model_config, causal_lm=True)
    check_weight_shapes(model_dir, skeleton)
    infos, num_layers = target_modules(skeleton, args.target_modules, model_dir)
    base = lora_config(infos, args.r, args.alpha, args.target_modules)
    configs = {"lora": base, **{f"bishare_{t}": c for t, c in bishare_configs(base, infos, num_layers).items()}}
    if planned_sets is not None:
        _note_plan_fields(plan, base, args.plan)
        configs.update(_sharelora_configs(base, planned_sets, infos, num_layers, f"--plan {args.plan}"))
    from .training import Windows, token_stream

    tokenizer = load_tokenizer(model_dir)
    train_tokens = token_stream(tokenizer, train_texts)
    try:
        Windows(train_tokens, args.seq_len, args.batch_size, tokenizer.bos_token_id, args.seed)
    except ValueError as err:
        raise CommandError(f"{err}: lower --seq-len or give a longer --text") from err
    heldout_tokens = token_stream(tokenizer, heldout_texts)
    if len(heldout_tokens) + (tokenizer.bos_token_id is not None) < 2:  # a window predicts its tokens after the first
        raise CommandError(f"--heldout {args.heldout}: the held-out text ({text_note['heldout']}) is "
                           f"{counted(len(heldout_tokens), 'token')}, and the tokenizer has no BOS token to start a "
                           "window with: no token to predict; hold out more or longer paragraphs")
    return Setup(model_dir, model_config, out, device, methods, infos, num_layers, configs, calibration, tokenizer,
                 train_tokens, heldout_tokens, text_note)


def _found_sharelora_configs(model, setup: Setup, args: argparse.Namespace) -> dict:
    """The ShareLoRA configs of the share sets found on ``setup.calibration``, as `plan` finds them."""
    from ..similarity import share_sets
    from .plan import similarity

    max_length = min(CALIBRATION["max_length"], max_positions(setup.model_config) or CALIBRATION["max_length"])
    S = similarity(model, setup.tokenizer, setup.calibration, max_length, CALIBRATION["position"],
                   CALIBRATION["batch_size"])
    sets = [g for g in share_sets(S, args.eps, method=CALIBRATION["method"]) if len(g) > 1]
    return _sharelora_configs(setup.configs["lora"], sets, setup.infos, setup.num_layers,
                              f"share sets found at eps={args.eps}")


def _train_method(base_model, config, setup: Setup, args: argparse.Namespace, bar, interrupts) -> dict | None:
    """Train a copy of ``base_model`` with ``config``: its compare.json row, or None if a Ctrl-C
    (``interrupts``, an ``Interrupts``) stopped its training before the last step."""
    import torch

    from ..model import apply, trainable_parameters
    from .training import Windows, adapter_optimizer, heldout_loss, train

    model = copy.deepcopy(base_model)
    torch.manual_seed(args.seed)
    apply(model, config)
    opt = adapter_optimizer(model, args.lr)
    batches = Windows(setup.train_tokens, args.seq_len, args.batch_size, setup.tokenizer.bos_token_id, args.seed)
    log = train(model, opt, batches, args.steps, lambda step, loss: (bar.update(), bar.set_postfix(loss=f"{loss:.3f}")),
                interrupts)
    if log.interrupted:
        return None
    tail = log.losses[-max(1, len(log.losses) // 10):]
    return {
        "label": label(config, setup.infos, setup.num_layers), "config": config.to_dict(),
        "trainable_params": trainable_parameters(model),
        "optimizer_state_bytes": sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t)),
        "step_ms_median": log.median_step_ms(), "train_loss": sum(tail) / len(tail),
        "heldout_loss": heldout_loss(model, setup.heldout_tokens, args.seq_len, setup.tokenizer.bos_token_id, EVAL_BATCH),
        "train_losses": log.losses,
    }


def _sharelora_configs(base, sets: list[list[int]], infos, num_layers: int, source: str) -> dict:
    """The ShareLoRA configs of ``sets`` (without and with rank expansion); CommandError naming ``source``
    if they do not fit."""
    configs = {}
    for name, expand in (("sharelora", False), ("sharelora_expanded", True)):
        try:
            configs[name] = dataclasses.replace(base, method="similarity", share_sets=sets, expand_rank=expand)
        except ValueError as err:
            raise CommandError(f"{source}: {err}") from err
        parameter_count(configs[name], infos, num_layers, what=source)
    return configs


def _texts(args: argparse.Namespace) -> tuple[list[str], list[str], dict]:
    """(training paragraphs, held-out paragraphs, a note on where each came from); no line or paragraph is in both."""
    from ..data import task_line_count, task_texts

    if args.text is None:
        train = task_texts()
        seen = set(line for p in train for line in p.splitlines())
        if 4 * args.heldout > task_line_count() - len(seen):
            raise CommandError(f"--heldout {args.heldout}: the built-in task has only "
                               f"{(task_line_count() - len(seen)) // 4} paragraphs of lines it does not train on")
        fresh = list(dict.fromkeys(line for p in task_texts(64 * args.heldout, seed=1) for line in p.splitlines()
                                   if line not in seen))
        if len(fresh) < 4 * args.heldout:
            raise CommandError(f"--heldout {args.heldout}: the built-in task has only {len(fresh) // 4} held-out paragraphs")
        heldout = ["\n".join(fresh[4 * k : 4 * k + 4]) for k in range(args.heldout)]
        return train, heldout, {"train": f"the built-in task ({len(train)} paragraphs)",
                                "heldout": f"{len(heldout)} paragraphs of the built-in task, no line of them trained on"}
    texts = load_texts(args.text, None)
    if args.heldout >= len(texts):
        raise CommandError(f"--heldout {args.heldout} leaves no training paragraph: {args.text} holds {len(texts)}")
    return texts[: -args.heldout], texts[-args.heldout :], {
        "train": f"{args.text}: its first {len(texts) - args.heldout} paragraphs",
        "heldout": f"{args.text}: its last {args.heldout} paragraphs"}
