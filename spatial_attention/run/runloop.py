"""The one run loop of every experiment that goes over worlds or pairs.

A driver parses its options in ``main``, checks them and its data, and then
calls, in this order:

- ``open_results(results, identity)``: the folder is claimed (a lock file: a
  second run on it stops with one line), the results already there were made
  with the same settings (as far as they are known before the model loads),
  and their lines are sound;
- ``load_run(...)``: the model, as a frozen ``Run`` (``open_run`` does these
  two and starts run.json, for an experiment with one results folder);
- ``resumable_map(...)``: the items not yet done, appended as they finish,
  sharded over the processes of ``accelerate launch``, merged; it returns the
  records of exactly the items asked for, which is what the summary covers
  (``resumable_map_many``: one item's work into several results folders).

The identity of a folder (``identity.json`` beside its records) is everything
that changes the numbers: the model (family, checkpoint, revision, dtype), the
layers, the feed size, the data, the seeds and controls of the experiment. Its
keys are the options' names, so that a refusal names the option to change.
"""
from __future__ import annotations

import atexit
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Hashable, Iterable, Iterator, Sequence

from tqdm import tqdm

from spatial_attention.common.console import check_at_least
from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import (RecordCheck, append_jsonl, check_output_dir, claim_output, read_jsonl,
                                            read_jsonl_at, run_record, start_run, write_atomic, write_json)
from spatial_attention.data.generate import shapeworld_folder
from spatial_attention.run.options import ModelOptions, checkpoint_name, dtype_name, layer_indices, parse_shards
from spatial_attention.stats.inference import json_safe

if TYPE_CHECKING:
    from models import VLMAdapter

log = logging.getLogger("spatial_attention")

IDENTITY_FILE = "identity.json"
RESULTS_KEY = "results file"  # the identity's record of which results file it describes
# identity keys that are not an option of every script, as a refusal names them
SETTING_NAMES = {"--model": "the model family (--model; experiments 1 and 2: the script)"}


# --- the work split -------------------------------------------------------------------

class ProcessShare:
    """This process's part of the work under ``accelerate launch`` (all of it otherwise).

    Items are dealt round-robin; each process appends to its own part file and
    the main process merges the parts once all are done.
    """

    def __init__(self, device: str = "auto"):
        import torch
        from accelerate import PartialState

        # Processes started by `accelerate launch --multi_gpu` (torchrun) on a machine without
        # GPUs, or asked to run on the CPU, join one gloo group.
        cpu = device == "cpu" or not torch.cuda.is_available()
        self.state = PartialState(cpu=cpu)
        self.rank = self.state.process_index
        self.size = self.state.num_processes
        if self.size > 1:  # torn down before the interpreter's own exit, where gloo's threads can abort a process
            atexit.register(self.state.destroy_process_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self):
        return self.state.device

    def take(self, items: Sequence) -> list:
        return [item for i, item in enumerate(items) if i % self.size == self.rank]

    def part_path(self, path: Path) -> Path:
        """Where this process appends: ``path`` itself in a single-process run."""
        path = Path(path)
        return path if self.size == 1 else path.with_name(f"{path.stem}.part{self.rank}{path.suffix}")

    def wait(self) -> None:
        self.state.wait_for_everyone()

    def main_checks(self, check: Callable[[], object]) -> None:
        """Run ``check`` in the main process only; when it refuses (OptionError, DataError) every process
        stops, the main one with the error (said once), so that none goes on to load a model."""
        error = None
        if self.is_main:
            try:
                check()
            except (OptionError, DataError) as err:
                error = err
        if self.size > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            if self.is_main:
                raise error
            raise SystemExit(2)

    def gather(self, items: list) -> list:
        """Every process's ``items``, concatenated in rank order (every process must call it)."""
        if self.size == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))


def record_files(path: Path) -> list[Path]:
    """``path`` and the part files a multi-process run left beside it (all merged into ``path``
    when the run finishes; a killed run leaves them, and the next one reads them)."""
    path = Path(path)
    return [path, *sorted(path.parent.glob(f"{path.stem}.part*{path.suffix}"))]


def existing_records(path: Path, check: RecordCheck | None = None) -> Iterable[dict]:
    """Every record earlier runs finished, from ``path`` and its part files (see read_jsonl)."""
    for source in record_files(path):
        yield from read_jsonl(source, check)


# --- identity ---------------------------------------------------------------------------

def _as_json(value):
    return json.loads(json.dumps(json_safe(value)))


def check_identity(records: Path, identity: dict, option: str) -> None:
    """Refuse to add to ``records`` (a results file) when the results already there were made with
    other settings: OptionError naming the first setting that differs. Only the keys of ``identity``
    are compared, so that what is known before the model loads can be checked then. Refuse too a
    folder that holds another command's results (its run.json and summary would be written over)."""
    records = Path(records)
    folder = records.parent
    recorded = recorded_identity(folder)
    check_free(folder, records.name, option)
    if not _has_records(records):
        return
    if not isinstance(recorded, dict):
        raise DataError(f"{records}: results without a readable {IDENTITY_FILE} beside them, so there is no telling "
                        f"how they were made; delete {records.name} to start over, or choose another "
                        f"{option}")
    compare_identity(records, recorded, identity, option)


def compare_identity(records: Path, recorded: dict, identity: dict, option: str) -> None:
    """OptionError naming the first key of ``identity`` that ``recorded`` (the identity the results file ``records``
    was made with) lacks or holds with another value."""
    records = Path(records)
    folder = records.parent
    for key, value in _as_json(identity).items():
        if key not in recorded:
            raise OptionError(f"{option} {folder}: its {IDENTITY_FILE} does not record {key}, so there is no "
                              f"telling whether its results match this run; choose another {option}, or delete "
                              f"{records.name} there to redo them")
        if recorded[key] != value:
            if isinstance(value, bool):  # a switch: made with it or without it
                made, now = ("with", "without") if recorded[key] else ("without", "with")
                difference = f"{made} {key}, and this run is {now} it"
            else:
                difference = f"with {SETTING_NAMES.get(key, key)} {recorded[key]!r}, not {value!r}"
            raise OptionError(f"{option} {folder}: its results were made {difference}; rerun with the same setting "
                              f"to resume, or choose another {option}")


def recorded_identity(folder: Path) -> dict | None:
    """The identity.json of ``folder`` as a dict; None where it is missing or unreadable."""
    try:
        recorded = json.loads((folder / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def check_free(folder: Path, results_name: str, option: str) -> None:
    """OptionError when ``folder`` holds another command's results (its identity.json names a results file
    other than ``results_name``, with content): writing there would replace their run.json and summary."""
    other = (recorded_identity(folder) or {}).get(RESULTS_KEY)
    if other and other != results_name and _has_records(folder / other):
        raise OptionError(f"{option} {folder}: holds the results of another command ({other}); choose another "
                          f"{option}")


def mark_results(folder: Path, results_name: str) -> None:
    """Record in ``folder`` that it holds ``results_name`` of a command that does not resume (it rewrites its
    outputs each time), so that no other command writes over them (``check_free``)."""
    write_json(Path(folder) / IDENTITY_FILE, {RESULTS_KEY: results_name})


def _has_records(path: Path) -> bool:
    return any(p.is_file() and p.stat().st_size for p in record_files(path))


# --- the loop ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Results:
    """A results file of one folder: where, how an item and a record are keyed, and how a line is checked."""
    path: Path
    item_key: Callable[[object], Hashable]
    record_key: Callable[[dict], Hashable]
    check: RecordCheck | None = None
    option: str = "--out"  # the option that names the folder, for messages
    # whether a record was made from this very item (the same caption, boxes ...), where the identity cannot
    # tell: data regenerated in place keeps its folder and keys
    same_item: Callable[[object, dict], bool] | None = None

    def read(self) -> list[dict]:
        """Every record finished so far (checked line by line, see read_jsonl), one per key."""
        by_key = {}
        for record in existing_records(self.path, self.check):
            by_key.setdefault(self.record_key(record), record)
        return list(by_key.values())


def world_results(path: Path, check: RecordCheck, same_item: Callable[[object, dict], bool]) -> Results:
    """A results file with one record per ShapeWorld world: items and records both carry shard and index."""
    return Results(path, item_key=lambda item: (item.shard, item.index),
                   record_key=lambda record: (int(record["shard"]), int(record["index"])), check=check,
                   same_item=same_item)


def open_results(results: Results, identity: dict, items: Sequence = ()) -> list[dict]:
    """Before the model loads (main process): claim the folder, read every finished record, so that a
    damaged line fails now, refuse results made with another ``identity`` (what is known so far) or from
    other ``items`` than the ones of their keys; returns the records."""
    records = results.read()
    check_results(results, identity, items, records)
    return records


def check_results(results: Results, identity: dict, items: Sequence, records: list[dict]) -> None:
    """``open_results`` on records already read: claim the folder, check its identity and that each done
    item's record was made from it."""
    claim_output(results.path.parent, results.option)
    check_identity(results.path, identity, results.option)
    if results.same_item is not None and records:
        by_key = {results.record_key(record): record for record in records}
        for item in items:
            key = results.item_key(item)
            if key in by_key and not results.same_item(item, by_key[key]):
                raise OptionError(f"{results.option} {results.path.parent}: its results for {key} were made from "
                                  f"other data than this run's (regenerated in the same folder?); choose another "
                                  f"{results.option}")


def resumable_map(share: ProcessShare, results: Results, items: Sequence, fn: Callable[[list], Iterable[dict]],
                  identity: dict, batch_size: int = 1, desc: str = "", unit: str = "item",
                  prepare: Callable[[list], object] | None = None) -> StoredRecords | list:
    """Run ``fn`` over the ``items`` whose key has no record yet, ``batch_size`` at a time, appending
    each record it returns as its batch finishes; the processes of an ``accelerate launch`` take turns
    (round-robin) and the main process merges their part files. With ``prepare``, ``fn`` is given
    ``prepare(batch)`` instead of the batch, made one batch ahead in a background thread (``ahead``), so
    that reading and encoding inputs runs beside the forward instead of between two.

    Refuses (OptionError) when the folder's records were made with another ``identity``, and when
    another run holds the folder. Each key is written once: items repeating a key are done once, and
    the merge keeps one record per key. Returns, in the main process, the records of exactly
    ``items`` (in their order; an item ``fn`` gave no record for is absent) as ``StoredRecords``, whose
    ``made`` counts the items this call ran (in every process); [] in the others.
    """
    stored = resumable_map_many(share, [(results, identity)], items, lambda given, _: ((r,) for r in fn(given)),
                                batch_size, desc, unit, prepare)
    return stored[0] if stored else []


def resumable_map_many(share: ProcessShare, targets: list[tuple[Results, dict]], items: Sequence,
                       fn: Callable[[object, tuple[bool, ...]], Iterable[tuple[dict | None, ...]]],
                       batch_size: int = 1, desc: str = "", unit: str = "item",
                       prepare: Callable[[list], object] | None = None) -> list[StoredRecords]:
    """``resumable_map`` into several results files (``targets``: each with its identity) at once, a batch's work
    shared by several analyses of the same items (one forward, several head specs' ablations): ``fn(batch,
    wanted)`` gives per item a tuple of records, one for each target, where ``wanted`` says which targets lack an
    item of the batch (the others' entries may be None: nothing of theirs is redone). An item runs when any target
    lacks it, and each record is appended only where its target lacks it. Returns each target's
    ``StoredRecords`` (``made``: the items appended to it) in the main process, [] in the others."""
    records = [results.read() for results, _ in targets]  # every process: what earlier runs finished (read once)
    for (results, identity), found in zip(targets, records):
        share.main_checks(lambda: check_results(results, identity, items, found))
    for (results, identity), found in zip(targets, records):
        if share.is_main and not found:
            write_json(results.path.parent / IDENTITY_FILE, {RESULTS_KEY: results.path.name, **identity})
    share.wait()
    key_of = targets[0][0].item_key  # the targets' items are the same items
    unique: dict = {}  # key -> the first item with it
    for item in items:
        unique.setdefault(key_of(item), item)
    done = [{results.record_key(record) for record in found} for (results, _), found in zip(targets, records)]
    lacking = [[key for key in unique if key not in keys] for keys in done]
    for (results, _), missing in zip(targets, lacking):
        if len(missing) < len(unique):
            log.info("resuming: %d of %d %ss already in %s", len(unique) - len(missing), len(unique), unit,
                     results.path)
    todo = [unique[key] for key in unique if any(key not in keys for keys in done)]
    share.wait()  # every process has read what is done before any of them appends
    mine = share.take(todo)
    if share.size > 1:
        log.info("process %d of %d: %d of %d %ss to do", share.rank + 1, share.size, len(mine), len(todo), unit)
    parts = [share.part_path(results.path) for results, _ in targets]
    progress = tqdm(total=len(mine), desc=desc, unit=unit, disable=not share.is_main)
    chunks = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
    for chunk, given in zip(chunks, chunks if prepare is None else ahead(prepare, chunks)):
        wanted = tuple(any(key_of(item) not in keys for item in chunk) for keys in done)
        for made in fn(given, wanted):
            for (results, _), part, keys, record in zip(targets, parts, done, made, strict=True):
                if record is not None and results.record_key(record) not in keys:
                    append_jsonl(part, record)
        progress.update(len(chunk))
    progress.close()
    share.wait()
    if not share.is_main:
        return []
    stored = []
    for (results, _), missing in zip(targets, lacking):
        if share.size > 1 or len(record_files(results.path)) > 1:
            _merge(results, list(unique))
        stored.append(StoredRecords(results, list(unique), made=len(missing)))
    return stored


def ahead(prepare: Callable[[list], object], chunks: list[list]) -> Iterator:
    """``prepare(chunk)`` of each chunk in turn, the next one made in a background thread while the caller works
    with this one. An error in ``prepare`` is raised where its chunk is taken."""
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        pending = pool.submit(prepare, chunks[0])
        for following in chunks[1:] + [None]:
            ready = pending.result()
            pending = None if following is None else pool.submit(prepare, following)
            yield ready


class StoredRecords:
    """The records of ``keys`` (those that have one), in that order, read from the results file each time they
    are iterated: held in memory, a 5,000-world run's records would be tens of MB (bench/long_run_memory.py)."""

    def __init__(self, results: Results, keys: list, made: int = 0):
        self.record_key, self.made = results.record_key, made
        self.where: dict = {}  # key -> (file, byte offset) of its first record
        for source in record_files(results.path):
            for offset, record in read_jsonl_at(source, results.check):
                self.where.setdefault(results.record_key(record), (source, offset))
        self.keys = [key for key in keys if key in self.where]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[dict]:
        files: dict[Path, BinaryIO] = {}
        try:
            for key in self.keys:
                source, offset = self.where[key]
                f = files.get(source) or files.setdefault(source, open(source, "rb"))
                f.seek(offset)
                record = json.loads(f.readline().decode("utf-8"))
                if self.record_key(record) != key:
                    raise DataError(f"{source}: changed while this run was reading it (the record at byte {offset} "
                                    "is another item's); run the command again")
                yield record
        finally:
            for f in files.values():
                f.close()


def _merge(results: Results, order: list) -> None:
    """Fold the part files into the results file, one record per key: the asked items' in their order,
    then any others (earlier runs' items) in the order they were found."""
    records = results.read()
    rank = {key: i for i, key in enumerate(order)}
    records.sort(key=lambda r: rank.get(results.record_key(r), len(rank)))  # stable: the others keep their order
    lines = [json.dumps(json_safe(r), allow_nan=False) for r in records]
    write_atomic(results.path, "".join(line + "\n" for line in lines))
    for part in record_files(results.path)[1:]:
        part.unlink(missing_ok=True)


# --- the run ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """What an experiment runs with, fixed once the model is loaded: nothing below ``main`` changes it."""
    options: ModelOptions
    share: ProcessShare
    adapter: VLMAdapter
    layers: tuple[int, ...]  # 0-based
    batch_size: int  # items (worlds, caption pairs, image pairs) per forward pass
    out: Path | None  # the output folder (experiment 3: the parent of one folder per corner)
    data: Path | None  # the input data folder, where there is one
    settings: dict  # the command's options as given (``vars(args)``), for run.json
    clock: tuple[float, float] = field(default_factory=lambda: _clock())  # (wall clock, forward seconds) when built

    @property
    def layer_numbers(self) -> list[int]:
        """The layers 1-based, as results and reports write them."""
        return [layer + 1 for layer in self.layers]

    def identity(self) -> dict:
        """The model's part of a results folder's identity, with the loaded model's own values."""
        adapter = self.adapter
        return {**self.options.identity(), "--model": adapter.family,
                "--model-path": checkpoint_name(adapter.model_path),
                "--dtype": dtype_name(adapter.dtype), "--layers": self.layer_numbers,
                "--feed-size": list(adapter.feed_size) if adapter.feed_size else None}

    def record(self, **extra) -> dict:
        """A run.json record of this run (runio.run_record), with the layers and feed size it used."""
        return run_record(self.settings, self.adapter, layers_0based=list(self.layers),
                          feed_size=self.adapter.feed_size, **extra)

    def timing(self, items: int, since: tuple[float, float] | None = None) -> dict:
        """run.json's ``timing``: where this process's time went since the model was built (or since ``since``, a
        ``Run.now()``: one of several runs of one model), over ``items`` items (those this command ran):
        ``forward_seconds`` in the model's forwards (``capture.forward_seconds``), ``other_seconds`` everything
        else (inputs, metrics, writing, summary, figures)."""
        wall, forward = (now - then for now, then in zip(_clock(), since or self.clock))
        return {"items": items, "forward_seconds": round(forward, 3), "other_seconds": round(wall - forward, 3)}


    @staticmethod
    def now() -> tuple[float, float]:
        """The clocks ``timing`` measures from: (wall clock, forward seconds)."""
        return _clock()


def _clock() -> tuple[float, float]:
    from spatial_attention.engine.capture import forward_seconds

    return time.perf_counter(), forward_seconds()


def join_processes(options: ModelOptions) -> tuple[ModelOptions, ProcessShare]:
    """This process's share of the work, and ``options`` with the device it runs on: under
    ``accelerate launch``, --device auto means the process's own device."""
    share = ProcessShare(options.device)
    if share.size > 1 and options.device == "auto":
        options = replace(options, device=str(share.device))
    return options, share


def load_run(options: ModelOptions, share: ProcessShare, settings: dict, out: Path | None,
             data: Path | None = None, default_layers: str | None = None) -> Run:
    """Load the model of ``options``; ``--layers`` defaults to ``default_layers``, else to the layers
    the paper used with the family (``paper_layers``), and is checked against the model's depth."""
    from models import load_adapter

    adapter = load_adapter(options.family, options.model_path, device=options.device, dtype=options.dtype,
                           device_map=options.device_map, revision=options.revision, seed=options.seed,
                           random_init_seed=options.random_init_seed)
    if options.feed_size:
        adapter.set_feed_size(options.feed_size)
    layers = layer_indices(options.layers or default_layers or adapter.paper_layers, adapter.num_layers)
    batch_size = options.batch_size or (8 if adapter.device.type == "cuda" else 1)
    return Run(options, share, adapter, tuple(layers), batch_size, out, data, dict(settings))


def open_run(options: ModelOptions, share: ProcessShare, results: Results, identity: dict, settings: dict,
             items: Sequence = (), data: Path | None = None, default_layers: str | None = None) -> tuple[Run, dict]:
    """What a one-folder experiment does from its results folder to its first item: claim the folder and
    check its identity (the model's part as known before the load, plus the experiment's ``identity``),
    load the model (``load_run``), check the identity again with the loaded model's values, and write
    run.json ("running"). Returns the run and the folder's whole identity, for ``resumable_map``."""
    share.main_checks(lambda: open_results(results, {**options.identity(default_layers), **identity}, items))
    run = load_run(options, share, settings, results.path.parent, data, default_layers)
    whole = {**run.identity(), **identity}
    share.main_checks(lambda: check_identity(results.path, whole, results.option))  # before run.json changes
    if share.is_main:
        start_run(results.path.parent / "run.json", run.record(data=str(data)))
    return run, whole


def prepare_run(family: str, args) -> tuple[ModelOptions, ProcessShare, Path, list[int] | None]:
    """What an experiment over ShapeWorld does first: check the model options, --shards, --limit and the
    output folder (``args.out``), join the processes, and find the data folder (the default one generated
    once, by the main process). Returns the options, the share, the data folder and the shards to read."""
    options = ModelOptions.from_args(family, args)
    shards = parse_shards(args.shards)
    check_at_least(1, limit=args.limit)
    check_output_dir(args.out, "--out")
    options, share = join_processes(options)
    data = shapeworld_folder(args.data, options.seed) if share.is_main else args.data
    share.wait()
    return options, share, data, shards
