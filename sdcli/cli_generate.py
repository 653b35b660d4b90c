"""The body shared by txt2img, img2img and inpaint: options -> jobs -> images written, and the report.

Results go to stdout (one path, or one JSON object, per image); seeds, warnings, progress and errors to
stderr. A job that fails is reported with its prompt-file line and the others still run; the exit code
says what happened: 0 all written, 1 something failed, 128 + signal number when stopped by a signal.
Under torchrun or srun each process makes its share of the images (`sdcli.distributed`) and rank 0 prints
one summary of the whole run; the exit code is then the whole run's, on every process.
"""

from __future__ import annotations

import json
import sys

from sdcli.errors import UsageError


def stderr(message: str) -> None:
    sys.stderr.write(message + "\n")


def generate_command(command: str, opts: dict) -> int:
    """Run one generating command with its parsed options; returns the exit code."""
    from sdcli.devices import resolve_device
    from sdcli.distributed import joined, launch_from_env, place

    launch = launch_from_env()
    device = place(resolve_device(opts["device"]), launch) if launch.distributed else None
    with joined(launch, device) as group:
        return _generate_command(command, opts, group)


def _generate_command(command: str, opts: dict, group) -> int:
    from sdcli import run_load
    from sdcli.batch import Interrupted, Written, run
    from sdcli.distributed import deal
    from sdcli.lora_sets import ActiveLoras
    from sdcli.outputs import ensure_writable
    from sdcli.progress import progress_report, sampling_steps
    from sdcli.request import is_random_seed
    from sdcli.run_files import embedding_library, uses_taesd
    from sdcli.run_jobs import read_jobs
    from sdcli.run_plan import find_written, plan_run
    from sdcli.run_prompts import check_prompts
    from sdcli.run_record import image_record
    from sdcli.signals import stop_on_signals, stopped_message
    from sdcli.weights import short_hash

    quiet = opts["quiet"]
    report = progress_report(opts["progress"], quiet)
    warn = (lambda message: None) if quiet else (lambda message: stderr(f"warning: {message}"))
    jobs, source, png = read_jobs(command, opts)
    failures = 0
    launch = group.launch

    def fail(where: str, message: str, shared: bool = False) -> None:
        nonlocal failures
        if shared and launch.rank != 0:
            return  # every process finds it: rank 0 reports it once
        failures += 1
        stderr(f"error: {where}: {message}")

    for line_error in source.errors:
        fail(f"{source.name} line {line_error.line}", line_error.message, shared=True)
        if opts["fail_fast"]:
            return 1
    plan = plan_run(command, opts, jobs, source, png, group, warn, lambda where, message: fail(where, message, True))
    if plan is None:
        return 1
    planned, model_path = plan.planned, plan.model_path
    skipped = (
        find_written(plan, group, embedding_library(opts))
        if opts.get("skip_existing", False)
        else [False] * len(planned)
    )
    todo = [p for p, done in zip(planned, skipped, strict=True) if not done]
    if not todo:
        return _final_report(group, 0, failures, len(planned), quiet)
    # Every image's global index is its place in the plan (prompt-file order, then image number).
    global_index = {id(p): i for i, p in enumerate(planned)}
    owners = deal([sampling_steps(p.request) for p in todo], launch.world_size)
    mine = [p for p, owner in zip(todo, owners, strict=True) if owner == launch.rank]
    if not mine:  # more processes than images left: this one only joins the report
        return _final_report(group, 0, failures, sum(skipped), quiet)
    ensure_writable(p.target.parent for p in planned)
    device, dtype = run_load.device_and_dtype(opts, launch)
    run_load.check_memory(model_path, plan.family, [p.request for p in mine], opts, device, dtype)
    first_loras = mine[0].request.loras  # the batches run LoRA set by set, that of this process's first image first
    embeddings = check_prompts(opts, plan.family, planned, warn, lambda text: sys.stderr.write(text))
    with report.loading(model_path.name):
        model = run_load.load_run_model(model_path, opts, warn, plan.loras.patch(first_loras), device, dtype)
        taesd = run_load.load_taesd(model, opts, warn)
    loras = ActiveLoras(plan.loras, model, first_loras)
    model_hash = short_hash(model_path)
    if plan.run_seed_used and is_random_seed(opts["seed"]) and not quiet and launch.rank == 0:
        stderr(f"seed: {plan.run_seed}")

    dropped = False
    with stop_on_signals() as stopped, report.sampling(mine, opts["batch_size"]) as progress:
        preview = run_load.preview_callback(model, opts, taesd)

        def on_step(info: dict) -> None:
            if stopped():
                raise Interrupted
            progress.step(info)
            if preview is not None:
                preview(info)

        try:
            for result in run(model, mine, batch_size=opts["batch_size"], overwrite=opts["overwrite"],
                              on_step=on_step, should_stop=stopped, vae_tiling=opts["vae_tiling"],
                              warn=warn, use_loras=loras.use, embeddings=embeddings,
                              taesd=taesd if uses_taesd(opts) else None):  # fmt: skip
                if isinstance(result, Written):
                    from_model = plan.job_defaults[id(result.planned.job)]
                    record = image_record(result, model_path.stem, model_hash, model.vae_path, from_model)
                    record.update(index=global_index[id(result.planned)], rank=launch.rank)
                    sys.stdout.write((json.dumps(record) if opts["json"] else str(result.path)) + "\n")
                    sys.stdout.flush()
                    progress.written(result)
                else:
                    fail(result.job.where(source.name), result.message)
        except Interrupted:
            dropped = True
    report.summary()
    if stopped():
        stderr(stopped_message(stopped(), report.written_count, len(mine), dropped, opts["batch_size"]))
        return 128 + stopped()  # no final report: the other processes may be gone
    return _final_report(group, report.written_count, failures, sum(skipped), quiet)


def _final_report(group, written: int, failures: int, skipped: int, quiet: bool) -> int:
    """The exit code of the whole run (1 when any process had a failure); with several processes rank 0
    prints one line: images written, skipped and failed, and each process's counts."""
    counts = group.gather([written, failures])
    failed = sum(f for _, f in counts)
    if not quiet and group.launch.rank == 0 and (group.launch.distributed or skipped):
        line = f"{sum(w for w, _ in counts)} written, {skipped} skipped (already written), {failed} failed"
        if group.launch.distributed:
            ranks = "; ".join(f"rank {r}: {w} written, {f} failed" for r, (w, f) in enumerate(counts))
            line = f"run of {len(counts)} processes: {line}; {ranks}"
        stderr(line)
    return 1 if failed else 0


def tokens_command(prompt: str, model: str | None, steps: int, embeddings_dir, weights_dir) -> None:
    """`sdcli tokens`: the prompt's reading on stdout, warnings on stderr."""
    from sdcli.download import resolve_model
    from sdcli.families import SD1
    from sdcli.request import MAX_STEPS
    from sdcli.run_files import model_family
    from sdcli.run_prompts import show_prompts
    from sdcli.weights import weights_dir as resolve_weights_dir

    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    directory = resolve_weights_dir(weights_dir)
    family = SD1 if model is None else model_family(resolve_model(model, directory, offline=True))
    opts = {"embeddings_dir": embeddings_dir, "weights_dir": weights_dir, "show_tokens": True}
    show_prompts(opts, family, [(prompt, steps)], lambda m: stderr(f"warning: {m}"), sys.stdout.write)
