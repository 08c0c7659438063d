"""The ``bnlab`` command: parses arguments and calls experiments; no math here.

    bnlab reproduce bn-mnist [--quick] [--steps N] [--data-dir DIR] [--out RUN_DIR] [--seed S] ...
    bnlab reproduce bn-mnist --resume RUN_DIR
    bnlab reproduce small-batch [--quick] [--batch-sizes 32,16,8,4,2] [--methods bn,gn,brn,cbn-naive,cbn] ...
    bnlab reproduce init-sweep [--quick] [--stds 16] [--epochs 20] ...
    bnlab reproduce lr-sweep [--quick] [--lrs 7] ...
    bnlab reproduce regularization [--quick] [--variants plain,weight-decay,dropout,bn] ...
    bnlab reproduce hparam-search [--quick] [--trials 100] [--lr-log10=-6,-2] ...
    bnlab plot RUN_DIR
    bnlab download-mnist [--dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from bnlab.data import DataError
from bnlab.experiments import ConfigError, runs
from bnlab.train import CheckpointError


def _field_flags(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per config field, its help the comment on the field."""
    import inspect

    comments = {}
    for klass in reversed([k for k in config_cls.__mro__ if dataclasses.is_dataclass(k)]):  # (inherited fields too)
        for line in inspect.getsource(klass).splitlines():
            name, _, rest = line.strip().partition(":")
            if "#" in rest:
                comments[name] = rest.split("#", 1)[1].strip()
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        helptext = f"{comments.get(f.name, '')} (default: {f.default})"
        if hints[f.name] is bool:
            parser.add_argument(runs.flag(f.name), action="store_true", default=None, help=helptext)
        else:
            kind = {int: int, float: float}.get(hints[f.name], str)
            parser.add_argument(runs.flag(f.name), type=kind, default=None, help=helptext)


def build_parser() -> argparse.ArgumentParser:
    from bnlab.experiments import EXPERIMENTS

    parser = argparse.ArgumentParser(prog="bnlab",
                                     description="Batch Normalization lab: reproduce the papers' experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    reproduce = sub.add_parser("reproduce", help="run a paper's experiment")
    which = reproduce.add_subparsers(dest="experiment", required=True)
    for name, module in EXPERIMENTS.items():
        p = which.add_parser(name, help=module.__doc__.strip().splitlines()[0])  # (the flags' help states defaults)
        _field_flags(p, module.Config)
        p.add_argument("--quick", action="store_true", help="a short run (a few thousand steps) for demos and CI")
        p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoints")
    plot = sub.add_parser("plot", help="redraw a run's figure from its saved metrics")
    plot.add_argument("run_dir")
    download = sub.add_parser("download-mnist", help="download MNIST (MD5-checked) for the experiments")
    download.add_argument("--dir", default=None, help="target folder (default: ~/.cache/bnlab/mnist)")
    return parser


def _config(module, args):
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(module.Config)
                 if getattr(args, f.name) is not None}
    if args.resume:
        cfg = module.load_config(args.resume)
        _refuse_changes(cfg, module.Config().quick() if args.quick else None, overrides, args.resume)
        return dataclasses.replace(cfg, out=args.resume, **{k: v for k, v in overrides.items() if k in RESUMABLE})
    cfg = module.Config()
    if args.quick:
        cfg = cfg.quick()
    cfg = dataclasses.replace(cfg, **overrides)
    return runs.with_out(cfg, args.experiment)  # a new folder each run: nothing earlier is overwritten


RESUMABLE = ("workers", "checkpoint_every", "download")  # how a resumed run runs, not what it computes


def _refuse_changes(recorded, quick, overrides: dict, run_dir: str) -> None:
    """A resumed run keeps the settings it recorded: a flag (or ``--quick``) that would change one
    is refused, naming it, instead of being ignored; flags that repeat the recorded values pass."""
    asked = {k: ("", v) for k, v in overrides.items()}
    if quick is not None:  # --quick's own settings, where no flag overrides them
        for f in dataclasses.fields(quick):
            if getattr(quick, f.name) != f.default and f.name not in asked:
                asked[f.name] = ("--quick's ", getattr(quick, f.name))
    changed = [f"{by}{runs.flag(k)} {v} (recorded: {getattr(recorded, k)})" for k, (by, v) in asked.items()
               if k not in RESUMABLE and not (k == "out" and Path(v) == Path(run_dir)) and getattr(recorded, k) != v]
    if changed:
        raise ConfigError(f"--resume {run_dir} continues the run with the settings it recorded; "
                          f"{', '.join(changed)} would change them. Start a new run for other settings")


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders this command made (innermost first) that are still empty."""
    for folder in folders:
        try:
            folder.rmdir()  # (only ever removes an empty folder)
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "reproduce":
            from bnlab.experiments import EXPERIMENTS

            module = EXPERIMENTS[args.experiment]
            cfg = _config(module, args)
            made = [folder for folder in (Path(cfg.out), *Path(cfg.out).parents) if not folder.exists()]
            try:
                module.run(cfg, resume=bool(args.resume))
            except (DataError, CheckpointError, ConfigError):
                _remove_if_empty(made)  # (refused before it wrote anything: no empty run folder left behind)
                raise
            except KeyboardInterrupt:
                print(f"\nInterrupted; checkpoints are in {cfg.out}. Resume with:\n"
                      f"  bnlab reproduce {args.experiment} --resume {cfg.out}", file=sys.stderr)
                return 130
        elif args.command == "plot":
            from bnlab.experiments import experiment_of

            experiment = experiment_of(args.run_dir)
            try:
                print(experiment.plot(Path(args.run_dir)))
            except (KeyError, IndexError, TypeError) as err:  # (a metrics.json edited, or of another version)
                raise ConfigError(f"{Path(args.run_dir) / 'metrics.json'} lacks what the figure needs ({err!r}); "
                                  f"was it written by this version of bnlab?") from err
        elif args.command == "download-mnist":
            from bnlab.data import download_mnist

            kwargs = {"dest": Path(args.dir)} if args.dir else {}
            print(f"MNIST is in {download_mnist(**kwargs)}")
    except (DataError, CheckpointError, ConfigError, FileExistsError) as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
