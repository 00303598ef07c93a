"""Argument parsing for ``flopwise train``, ``generate``, ``demo`` and ``data`` (kept apart
from cli.py so each command family has one file).

Handlers only parse, call ``flopwise.models.{train,demo,data,checkpoint}`` and print.
"""

from __future__ import annotations

import argparse
import json
import sys

from flopwise._cli_types import byte_value, positive_float as _positive_float, positive_int as _positive_int


def _cmd_train(args: argparse.Namespace) -> int:
    from flopwise.models.data import load_corpus
    from flopwise.models.train import Trainer, load_run_config

    overrides = {k: v for k, v in (("max_steps", args.steps), ("out_dir", args.out), ("seed", args.seed),
                                   ("device", args.device), ("compile", args.compile or None),
                                   ("batch_size", args.batch_size), ("seq_len", args.seq_len),
                                   ("grad_accum", args.grad_accum), ("lr", args.lr),
                                   ("warmup_steps", args.warmup_steps),
                                   ("eval_every", args.eval_every), ("save_every", args.save_every),
                                   ("time_budget_s", args.time_budget))
                 if v is not None}
    corpus = load_corpus(args.corpus)
    if args.allow_config_change and not args.resume:
        raise ValueError("--allow-config-change applies to --resume")
    if args.resume:
        if args.bos is not None:
            raise ValueError("--bos applies to a new run; a resumed run keeps the checkpoint's")
        if args.seed is not None:
            raise ValueError("--seed applies to a new run; a resumed run keeps the checkpoint's (its data order "
                             "and initialisation)")
        if args.config is not None:
            raise ValueError(f"CONFIG ({args.config}) applies to a new run; a resumed run keeps the checkpoint's "
                             "model (flags such as --steps or --lr change its training settings)")
        saved = _saved_train_config(args.resume)
        trainer = Trainer.resume(args.resume, corpus, force=args.force, allow_config_change=args.allow_config_change,
                                 **overrides)
        changed = [flag for key, flag in _SCHEDULE_FLAGS if key in overrides and overrides[key] != saved.get(key)]
        if changed:
            print(f"note: {', '.join(changed)} change{'s' if len(changed) == 1 else ''} the checkpoint's batches or "
                  "learning-rate schedule: the steps from here differ from the run it would have been",
                  file=sys.stderr)
        if trainer.step >= trainer.cfg.max_steps:
            raise ValueError(f"{args.resume} is at step {trainer.step} and max_steps is {trainer.cfg.max_steps}: "
                             f"nothing to train; pass --steps N with N > {trainer.step} to continue it")
        print(f"resumed {args.resume} at step {trainer.step}; checkpoints to {trainer.cfg.out_dir}/last",
              file=sys.stderr)
    else:
        from dataclasses import replace

        from flopwise.models.data import ByteData

        mc, tc = load_run_config(args.config if args.config is not None else "m1")
        tc = replace(tc, **overrides)
        trainer = Trainer(mc, tc, ByteData(corpus, seed=tc.seed, bos=args.bos), force=args.force)
    m = trainer.model
    print(f"model: {m.num_parameters():,} parameters, {trainer.flops_per_token:.3g} FLOPs/token at "
          f"S={trainer.cfg.seq_len}; corpus {corpus.name} ({len(corpus.train):,} B train); device {trainer.device}",
          file=sys.stderr)
    res = trainer.fit()
    summary = {"steps": trainer.step, "val_bpb": res.val_bpb, "tokens_per_s": res.tokens_per_s, "mfu": res.mfu,
               "seconds": res.seconds, "checkpoint": f"{trainer.cfg.out_dir}/last" if trainer.cfg.out_dir else None,
               "stopped_early": res.stopped_early}
    print(json.dumps(summary) if args.json else
          f"step {trainer.step}: val bpb {res.val_bpb:.4f}, {res.tokens_per_s:,.0f} tok/s, MFU "
          f"{'n/a' if res.mfu is None else f'{100 * res.mfu:.1f}%'}"
          + (f", checkpoint {summary['checkpoint']}" if summary["checkpoint"] else "")
          + (f", stopped early on the time budget ({trainer.cfg.time_budget_s:g} s) before max_steps "
             f"{trainer.cfg.max_steps}" if res.stopped_early else ""))
    return 0


# Resume overrides that change what the following steps compute (the batches, the lr schedule).
_SCHEDULE_FLAGS = (("batch_size", "--batch-size"), ("seq_len", "--seq-len"), ("grad_accum", "--grad-accum"),
                   ("lr", "--lr"), ("warmup_steps", "--warmup-steps"), ("max_steps", "--steps"))


def _saved_train_config(checkpoint: str) -> dict:
    """The TrainConfig fields recorded in the checkpoint's trainer_state.json ({} when it
    cannot be read: Trainer.resume then names the problem)."""
    from pathlib import Path

    try:
        cfg = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("train_config")
    except (OSError, ValueError, AttributeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from flopwise.models.checkpoint import load_model
    from flopwise.models.data import decode, encode

    from flopwise.models.train import resolve_device

    device = resolve_device(args.device)
    if device.type == "meta":
        raise ValueError("--device meta holds no values to generate with: pass cpu, cuda, ... (default auto)")
    if not -2**63 <= args.seed < 2**64:
        raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if args.top_k is not None and args.temperature == 0:
        raise ValueError("--top-k applies to sampling: pass --temperature > 0 with it (temperature 0 is greedy)")
    model = load_model(args.checkpoint, device=device)
    if model.cfg.vocab_size != 256:
        raise ValueError(f"generate encodes the prompt as bytes; the checkpoint's vocab_size is {model.cfg.vocab_size}")
    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    ids = encode(args.prompt)[None]
    bos = _run_bos(args.checkpoint)
    if bos is not None:  # the run saw this byte before every window: its contexts start with it
        ids = torch.cat((torch.tensor([[bos]], dtype=ids.dtype), ids), dim=1)
    ids = ids.to(device)
    room = model.cfg.max_seq_len - ids.shape[1]
    if room < 1:
        raise ValueError(f"prompt ({ids.shape[1]} bytes{', with the bos byte' if bos is not None else ''}) fills "
                         f"the model's max_seq_len {model.cfg.max_seq_len}")
    n = min(args.max_new_tokens, room)
    out = model.generate(ids, n, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                         use_cache=not args.no_cache)
    text = decode(out[0, ids.shape[1]:].cpu())
    print(args.prompt + text)
    if n < args.max_new_tokens:
        print(f"(stopped at max_seq_len {model.cfg.max_seq_len})", file=sys.stderr)
    return 0


def _run_bos(checkpoint: str) -> int | None:
    """The bos byte the checkpoint's run started every training window with
    (``trainer_state.json``), or None (none recorded, or no trainer state)."""
    from pathlib import Path

    f = Path(checkpoint) / "trainer_state.json"
    if not f.is_file():
        return None
    try:
        bos = json.loads(f.read_text()).get("data", {}).get("bos")
    except (ValueError, AttributeError):
        raise ValueError(f"corrupt {f}: cannot read the run's bos byte (data.bos)") from None
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or not 0 <= bos < 256):
        raise ValueError(f"corrupt {f}: data.bos must be a byte 0-255 or null, got {bos!r}")
    return bos


def _cmd_demo(args: argparse.Namespace) -> int:
    from flopwise.models.demo import run_demo

    run_demo(args.corpus, preset=args.preset, budget_s=args.budget_s, dense_steps=args.dense_steps,
             out_dir=args.out, device=args.device, progress=not args.quiet, threads=args.threads, force=args.force)
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from flopwise.models.data import fetch_corpus

    try:
        m = fetch_corpus(args.dir, force=args.force, log=lambda s: print(s, file=sys.stderr))
    except RuntimeError as exc:  # a missing apt-get / dpkg-deb or a failed download
        print(f"flopwise: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(m, indent=2) if args.json else
          f"{m['name']}: train {m['train_bytes']:,} B, val {m['val_bytes']:,} B, sha256 {m['sha256']}")
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    from flopwise.models.data import corpus_dir, load_corpus

    c = load_corpus(args.corpus)
    info = {"name": c.name, "description": c.description, "source": c.source, "train_bytes": len(c.train),
            "val_bytes": len(c.val), "sha256": c.sha256}
    if args.corpus is None and c.source == "embedded":
        # the default fell back to the embedded text: say where `data fetch` would have put the corpus
        info["fetched"] = f"none in {corpus_dir()} (`flopwise data fetch` writes it there)"
    print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a byte-level LM (AdamW, cosine, checkpoints, exact resume)")
    t.add_argument("config", nargs="?",
                   help="a model preset (tiny, m1, small, ...) or a JSON/TOML file {model: ..., train: ...} (default m1)")
    t.add_argument("--corpus", help="folder with train.txt/val.txt, a text file, or 'embedded' "
                                    "(default: the fetched corpus, else the embedded text)")
    t.add_argument("--out", help="checkpoint folder (writes OUT/last; default: none for a new run; a resumed run "
                                 "keeps its own, or writes CKPT/last if it has none)")
    t.add_argument("--force", action="store_true",
                   help="replace an existing checkpoint in OUT/last that is not this run's (never other files)")
    t.add_argument("--resume", metavar="CKPT", help="continue a checkpoint (its config; flags override)")
    t.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: train on although CKPT/config.json was edited since the save")
    t.add_argument("--steps", type=_positive_int, help="max_steps")
    t.add_argument("--batch-size", type=_positive_int)
    t.add_argument("--seq-len", type=_positive_int)
    t.add_argument("--grad-accum", type=_positive_int)
    t.add_argument("--lr", type=_positive_float)
    t.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 50)")
    t.add_argument("--eval-every", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--seed", type=int, help="initialisation and data order (a new run only)")
    t.add_argument("--time-budget", type=_positive_float, metavar="SECONDS",
                   help="stop training after this many seconds (checked between steps; a resumed run keeps no "
                        "earlier budget)")
    t.add_argument("--device", help="auto (default), cpu, cuda, ...")
    t.add_argument("--compile", action="store_true", help="torch.compile each block (regional compilation)")
    t.add_argument("--bos", type=byte_value, metavar="BYTE",
                   help="start every training window with this byte (0 for an M1 that `coding build` "
                        "restarts from an empty context; see ByteData)")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="continue a prompt with a trained checkpoint (KV cache)")
    g.add_argument("checkpoint", help="checkpoint folder (config.json + model.safetensors); a run trained with "
                                      "--bos gets that byte before the prompt, as in training")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive_int, default=200, help="bytes to generate (default 200)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-k", type=_positive_int, help="sample among the k most likely bytes")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--device", default="auto")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    g.set_defaults(func=_cmd_generate)

    d = sub.add_parser("demo", help="dense vs MoE vs MoD vs MoD+MoE byte LMs at matched FLOPs: one table")
    d.add_argument("--corpus", help="folder, text file or 'embedded' (default: the fetched corpus, else embedded)")
    d.add_argument("--budget-s", type=_positive_float, help="seconds for all training (default: 360 CPU, 480 GPU); the dense run's floor of "
                        "steps (CPU: 340) is trained even when it takes longer")
    d.add_argument("--dense-steps", type=_positive_int, help="fix the dense step count (skips the timing)")
    d.add_argument("--preset", choices=("cpu", "gpu", "smoke"), help="default: by device")
    d.add_argument("--threads", type=_positive_int,
                   help="CPU threads (default: 1 or all, whichever a timed step finds faster)")
    d.add_argument("--out", help="save each model's checkpoint to OUT/<model>")
    d.add_argument("--force", action="store_true",
                   help="replace earlier checkpoints in OUT/<model> (never folders of other files)")
    d.add_argument("--device", default="auto")
    d.add_argument("--quiet", action="store_true", help="no progress lines")
    d.set_defaults(func=_cmd_demo)

    p = sub.add_parser("data", help="the training corpus")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    f = dsub.add_parser("fetch", help="download and split the corpus (Debian bible-kjv-text + jargon-text)")
    f.add_argument("--dir", help="destination (default $FLOPWISE_DATA/corpus, ~/.cache/flopwise/corpus)")
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    f.add_argument("--json", action="store_true", help="print the manifest as JSON")
    f.set_defaults(func=_cmd_data_fetch)
    i = dsub.add_parser("info", help="which corpus training would use, its sizes and checksum")
    i.add_argument("--corpus")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_data_info)
