"""``bnwatch.watch``, ``bnwatch.profile``, ``bnwatch.load_profile`` and
``bnwatch.report_recalibration``: the public entry points (composition layer).

``watch`` picks the sink from ``store=`` so that ``bnwatch.capture`` never imports a store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from bnwatch.capture import Monitor, discover
from bnwatch.capture import profile as _profile
from bnwatch.capture.discovery import BatchNormLayer, check_layer_paths
from bnwatch.capture.monitor import default_source, watching, watching_model
from bnwatch.drift import DriftConfig

if TYPE_CHECKING:
    from bnwatch.alerts import AlertConfig
    from bnwatch.export import MonitorExporter
    from bnwatch.recalibration import RecalibrationResult
    from bnwatch.store.repository import RecalibrationInfo
    from bnwatch.triggers import AlertPipeline, Trigger, TriggerPolicy
from bnwatch.errors import ConfigError, ProfileNotFoundError, check_positive_int
from bnwatch.schema import REPORTED_STATUSES, Profile, check_name, check_text
from bnwatch.sink import MemorySink, Sink, acquire, release

logger = logging.getLogger("bnwatch")

__all__ = ["load_profile", "profile", "report_recalibration", "watch"]


def profile(
    model: nn.Module,
    data: Iterable[Any],
    *,
    name: str = "model",
    version: str = "0",
    store: str | None = None,
    token: str | None = None,
    **kwargs: Any,
) -> Profile:
    """Record a reference profile of every BatchNorm layer from validation data.

    See :func:`bnwatch.capture.profile` for the arguments.  With ``store`` the profile is also
    stored as the model version's reference (kind ``profile``, with its reservoirs), for
    reports and the dashboard:

    * a SQLAlchemy URL (``sqlite:///bnwatch.db``, ``postgresql://user@host/db``): written to
      that database (an empty one gets the schema created);
    * the URL of a bnwatch service (``http://bnwatch:8000``, ``https://...``): uploaded to
      its ``POST /api/v1/profiles`` (:func:`bnwatch.client.send_profile`), which writes it to
      the service's database -- for deployments whose monitors talk only to the service.

    Storing the same profile again stores nothing (references are deduplicated by their
    statistics).  A layer whose channel count differs from the layer already stored for this
    model version is refused and nothing is stored: a changed architecture needs a new
    ``version``.

    Args:
        token: the service's API token when ``store`` is a service URL (default
            ``$BNWATCH_API_TOKEN``); not allowed with any other ``store``.

    Raises:
        ConfigError: an argument is invalid, or a layer's module path is one the store cannot
            hold, as :func:`watch` refuses it (checked before any data is read).
        bnwatch.client.ServiceError: the service was unreachable or refused the profile
            (the HTTP status and the service's message say why; an unreachable or unhealthy
            service is found before any data is read).
        sqlalchemy.exc.SQLAlchemyError, SchemaError: a database ``store`` cannot be opened
            (found before any data is read) or written.
        bnwatch.store.repository.ChannelMismatchError: a database ``store`` holds a layer of
            that name with another channel count.
    """
    check_name("name", name)
    check_name("version", version)
    check_profile_store(store, token)
    result = _profile(model, data, name=name, version=version, **kwargs)
    if store is not None:
        store_profile(result, store, token=token)
    return result


def check_profile_store(store: str | None, token: str | None) -> None:
    """What :func:`profile` checks of ``store`` and ``token`` before the profiling pass, which
    a store found unusable after it would lose: a database is opened (created with the schema
    if empty, as storing would); a service must answer ``/healthz`` and have a token to give
    it (it refuses uploads without one; whether the token is right shows only on upload).  A
    SQLite file that does not exist yet is not created here: its folder must be writable."""
    service = is_service_url(store)
    if token is not None and not service:
        raise ConfigError("token", "<hidden>", "None unless store is an http(s):// service URL")
    if store is None:
        return
    if service:
        from bnwatch.client import TOKEN_ENV, check_service, profiles_endpoint, resolve_token

        profiles_endpoint(store)  # a bad URL fails now, not after the profiling pass
        if resolve_token(token) is None:
            raise ConfigError(
                "token",
                None,
                f"the service's API token (token=, else ${TOKEN_ENV}): a service refuses "
                "profile uploads without one",
            )
        check_service(store, what="the profile", undone="would not be stored")
        return
    from bnwatch.store.engine import parse_url
    from bnwatch.store.migrate import engine_for

    parsed = parse_url(store)
    file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if file and not os.path.exists(file):  # created by storing; not by a run that fails
        folder = os.path.dirname(os.path.abspath(file))
        if not os.access(folder, os.W_OK):
            raise ConfigError("store", store, f"a SQLite file in a folder you can write ({folder})")
        return
    engine_for(store).dispose()


def store_profile(result: Profile, store: str, *, token: str | None = None) -> None:
    """Store a recorded profile as :func:`profile` does with ``store``."""
    if is_service_url(store):
        from bnwatch.client import send_profile

        send_profile(store, result, token=token)
        return
    from bnwatch.store.migrate import engine_for
    from bnwatch.store.repository import Repository

    engine = engine_for(store)
    try:
        Repository(engine).write_profile(result)
    finally:
        engine.dispose()


def load_profile(store: str, name: str, version: str) -> Profile:
    """The reference profile stored for model ``name`` version ``version`` (the newest, if it
    was recorded more than once) -- for a monitor to judge drift against from its first
    window: ``bnwatch.watch(model, name=..., version=...,
    reference=bnwatch.load_profile(url, name, version))``.

    Its statistics and reservoir are bit for bit what :func:`profile` recorded; the store
    keeps no copy of the running statistics at the time (``running_mean`` is ``None``: a
    monitor compares with the model's own), and the reservoir's capacity is its rows.

    Args:
        store: a SQLAlchemy URL, or the URL of a bnwatch service (read without a token).

    Raises:
        ProfileNotFoundError: none is stored for that model version.
        ConfigError: ``store``, ``name`` or ``version`` is invalid.
        bnwatch.client.ServiceError: the service was unreachable or failed.
    """
    check_name("name", name)
    check_name("version", version)
    if not isinstance(store, str) or not store.strip():
        raise ConfigError("store", store, "a database URL or a bnwatch service's http(s):// URL")
    if is_service_url(store):
        from bnwatch.client import ServiceError, fetch_profile

        try:
            return fetch_profile(store, name, version)
        except ServiceError as err:
            if err.status == 404:
                raise ProfileNotFoundError(name, version, store) from err
            raise
    from bnwatch.store.engine import redacted
    from bnwatch.store.migrate import engine_for
    from bnwatch.store.repository import Repository

    engine = engine_for(store, create=False)
    try:
        found = Repository(engine).load_profile(name, version)
    except KeyError:
        found = None
    finally:
        engine.dispose()
    if found is None or not found.layers:
        raise ProfileNotFoundError(name, version, redacted(store))
    return found


def is_service_url(store: object) -> bool:
    """Whether ``store`` names a bnwatch service (``http(s)://``) rather than a database."""
    return isinstance(store, str) and store.strip().lower().startswith(("http://", "https://"))


def _make_sink(
    store: str | Sink | None,
    pipeline: AlertPipeline | None,
    *,
    token: str | None = None,
    source: str | None = None,
) -> Sink:
    """``None``: memory; an ``http(s)://`` URL: the HTTP sink to a bnwatch service; a
    SQLAlchemy URL: the background database writer (running the alert pipeline after each
    stored batch); a Sink: itself."""
    if store is None:
        return MemorySink()
    if isinstance(store, Sink):
        return store
    if isinstance(store, str):
        if is_service_url(store):
            from bnwatch.client import HttpSink  # httpx only when a service is used

            return HttpSink(store, token=token, source=source)
        from bnwatch.store.writer import StoreSink  # SQLAlchemy only when a store is used

        return StoreSink(store, on_stored=pipeline.on_stored if pipeline else None)
    raise ConfigError(
        "store", store, "None, a database URL, a bnwatch service URL or a bnwatch.sink.Sink"
    )


def watch(
    model: nn.Module,
    *,
    name: str = "model",
    version: str = "0",
    store: str | Sink | None = None,
    window_seconds: float | None = 60.0,
    reference: Profile | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    sample_every: int = 1,
    max_samples_per_batch: int | None = None,
    spatial_stride: int = 1,
    overhead_budget: float | None = 0.02,
    config: DriftConfig | None = None,
    alerts: AlertConfig | None = None,
    triggers: Sequence[Trigger] = (),
    recalibrate: TriggerPolicy | bool = False,
    source: str | None = None,
    keep_inputs: int = 0,
    metrics_port: int | None = None,
    metrics_addr: str = "127.0.0.1",
    token: str | None = None,
    reservoir: int | None = None,
) -> Monitor:
    """Watch every BatchNorm layer of ``model``; returns the running :class:`Monitor`.

    Args:
        model: any ``nn.Module``; all ``_BatchNorm`` subclasses at any depth are watched.
        name, version: identify the model in reports and stores: 1 to 200 characters, without
            '/' or control characters, and not '.' or '..' (they are path segments of the
            service's URLs).
        store: where closed windows go: ``None`` keeps them in memory (``mon.latest()``);
            a SQLAlchemy URL (``sqlite:///bnwatch.db``, ``postgresql://user@host/db``) stores
            them from a background thread (an empty database gets the schema created); the
            URL of a bnwatch service (``http://bnwatch:8000``, ``https://...``) sends them to
            it (:class:`bnwatch.client.HttpSink`: spooled to disk while the service is
            unreachable, delivered when it is back; alerts are evaluated by the service); or
            any object implementing :class:`bnwatch.sink.Sink`.
        token: the service's API token when ``store`` is a service URL (default
            ``$BNWATCH_API_TOKEN``).
        window_seconds: a window closes after this long (and on ``flush``/``close``);
            ``None`` closes windows only on ``flush``/``close``.
        reference: a :func:`profile` of validation data -- the drift baseline.  Without it,
            the first ``config.warmup_samples`` samples after attach become the baseline.
        include, exclude: fnmatch globs on qualified layer names.
        sample_every: measure at most one forward pass in ``sample_every``.
        max_samples_per_batch: measure at most this many samples of each batch.
        spatial_stride: measure every k-th position along each spatial dimension.
        overhead_budget: the share of model time the monitor may spend (0.02 = 2 %);
            the measured share of forwards adapts to stay within it.  ``None``: no limit.
        config: drift, gap and small-batch thresholds (:class:`DriftConfig`).
        alerts: alert rules (:class:`bnwatch.alerts.AlertConfig`) evaluated after each
            batch of windows stored in a database.
        source: this replica's id in stored windows: 1 to 200 characters, without control
            characters (default ``host:pid``, a host name too long for that cut to a prefix
            and a digest).  An open monitor of this process that watches any of the same
            layers under the same name, version and source -- the same ``watch()`` run
            again, as a notebook cell or a reloaded module does -- is closed first (its last
            window goes to its sink, with a warning): both would store the same traffic
            twice, under one source.
        keep_inputs: keep copies of the last ``keep_inputs`` input samples of measured
            forwards (``mon.kept_inputs()``, with when they arrived), e.g. to recalibrate on
            recent production data: the samples of the one tensor the forward is called with
            (positional, or ``model(pixel_values=x)``), or else the whole calls (a dict, a list
            of images, several tensors, a tensor and options), their samples counted at the
            first BatchNorm layer, replayed as they came and joined into batches where they
            have the same form.  A call that cannot be kept (more samples than
            ``keep_inputs``, or no BatchNorm layer reached) is skipped, and the first one says
            so in a warning.  They cost their size in memory: 1,024
            ImageNet inputs (3 x 224 x 224 float32) are 617 MB.
        reservoir: per layer and window, keep a uniform sample of at most this many
            per-sample channel means (float32 ``[k, C]``; 0 keeps none; ``None``, the
            default: 8 rows, fewer for wide models so that a window's reservoirs stay within
            256 KiB -- 2 rows on ResNet-50, see ``bnwatch.stats.default_reservoir_rows``).
            Stored with the window, they are what ``bnwatch report`` compares with the
            reference profile's reservoir (Evidently drift reports).  The rows are those
            compaction computes anyway: no extra host/device synchronization.
        metrics_port: serve the monitor's own Prometheus metrics on
            ``http://127.0.0.1:<port>/metrics`` (``0`` picks a free port); under a
            multi-process server set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
            multiprocess mode): the first process to bind the port serves them all.
        metrics_addr: the address ``metrics_port`` listens on: the loopback by default, so
            only the machine itself can scrape; ``"0.0.0.0"`` (or the host's address) lets a
            Prometheus elsewhere scrape it.
        triggers: :class:`bnwatch.triggers.Trigger` objects run after the alerts of each
            stored batch (a callback, a signed webhook, ...).
        recalibrate: ``True`` or a :class:`bnwatch.triggers.TriggerPolicy`: recalibrate in
            process, on the kept inputs, when a drift alert opens (needs a database
            ``store`` and ``keep_inputs``); applied only if held-out inputs improve.

    Raises:
        NoBatchNormError: the model has no BatchNorm layer (or the filters leave none).
        ConfigError: an argument is invalid; the message names it and what is allowed.
    """
    check_name("name", name)
    check_name("version", version)
    if source is not None:
        check_text("source", source)
    layers = discover(model, include, exclude)
    check_layer_paths(model, layers)  # module paths are stored too: fail here
    triggers = _check_triggers(triggers)
    pipeline = None
    if token is not None and not is_service_url(store):
        raise ConfigError("token", "<hidden>", "None unless store is an http(s):// service URL")
    if is_service_url(store):
        if triggers or recalibrate:
            raise ConfigError(
                "store",
                store,
                "a database URL when triggers or recalibrate are set (a bnwatch service "
                "evaluates alerts itself: set BNWATCH_WEBHOOK_URL and BNWATCH_WEBHOOK_SECRET "
                "on the service for its webhook triggers)",
            )
    elif isinstance(store, str):
        from bnwatch.alerts import AlertEngine
        from bnwatch.triggers import AlertPipeline

        pipeline = AlertPipeline(AlertEngine(alerts), triggers)
    elif triggers or recalibrate:
        raise ConfigError("store", store, "a database URL when triggers or recalibrate are set")
    if reservoir is not None:
        check_positive_int("reservoir", reservoir, minimum=0)
    if recalibrate:
        from bnwatch.triggers import MIN_KEPT_INPUTS

        if all(layer.frozen for layer in layers):
            raise ConfigError(
                "recalibrate",
                recalibrate,
                "False when every watched BatchNorm layer is frozen (FrozenBatchNorm2d): "
                "frozen layers are watched but never recalibrated",
            )
        # what a triggered recalibrate() takes (layers=None): the model's BatchNorm layers
        # that are not frozen and have running statistics (the others it leaves out)
        recalibrated = [
            layer
            for layer in discover(model)
            if not layer.frozen
            and getattr(layer.module, "running_mean", None) is not None
            and getattr(layer.module, "running_var", None) is not None
        ]
        if not recalibrated:
            raise ConfigError(
                "recalibrate",
                recalibrate,
                "False for a model whose BatchNorm layers are all frozen or without running "
                "statistics (track_running_stats=False): it has none to recalibrate",
            )
        # recalibration runs those layers in training mode, where torch refuses eps=0: every
        # triggered recalibration would fail, on every alert
        no_eps = [
            layer.name for layer in recalibrated if not float(getattr(layer.module, "eps", 1.0)) > 0
        ]
        if no_eps:
            raise ConfigError(
                "recalibrate",
                recalibrate,
                f"False for a model whose BatchNorm layers {', '.join(map(repr, no_eps[:5]))}"
                f"{', ...' if len(no_eps) > 5 else ''} have eps=0: torch cannot recalibrate "
                "them (eps must be positive in training mode); give them a positive eps "
                "(e.g. 1e-5, torch's default) or recalibrate without them yourself",
            )

        if keep_inputs < MIN_KEPT_INPUTS:
            raise ConfigError(
                "keep_inputs",
                keep_inputs,
                f">= {MIN_KEPT_INPUTS} when recalibrate is set (what it recalibrates on; "
                "512 to 1,024 suit method='precise')",
            )
    if metrics_port is not None and (
        isinstance(metrics_port, bool)
        or not isinstance(metrics_port, int)
        or not (0 <= metrics_port < 65536)
    ):
        raise ConfigError("metrics_port", metrics_port, "a TCP port number (0: any free one)")
    if not isinstance(metrics_addr, str) or not metrics_addr:
        raise ConfigError(
            "metrics_addr", metrics_addr, "an address to listen on ('0.0.0.0': every interface)"
        )
    sink = _make_sink(store, pipeline, token=token, source=source)
    # watch()'s own hold while it builds: a failure below releases it, which closes the sink
    # unless other monitors write to it too
    acquire(sink)
    twins = _twins(model, name, version, source or default_source(), layers)
    exporter: MonitorExporter | None = None
    taken: list[MonitorExporter] = []  # the twins' exporters serving on metrics_port
    try:  # whatever fails from here stops what was started: the writer, the metrics server
        if metrics_port is not None:
            from bnwatch.export import MonitorExporter

            # watch() run again: the new exporter goes on with the old one's metrics and,
            # once the new monitor runs, serves on the old one's port if it is the one asked for
            earlier = [t.sink for t in twins if isinstance(t.sink, MonitorExporter)]
            exporter = MonitorExporter(sink, succeeding=earlier[0] if earlier else None)
            taken = [e for e in earlier if metrics_port and e.serving(metrics_port, metrics_addr)]
            if not taken:
                exporter.serve(metrics_port, addr=metrics_addr)
        monitor = Monitor(
            model,
            layers,
            name=name,
            version=version,
            sink=sink if exporter is None else exporter,
            window_seconds=window_seconds,
            reference=reference,
            sample_every=sample_every,
            max_samples_per_batch=max_samples_per_batch,
            spatial_stride=spatial_stride,
            overhead_budget=overhead_budget,
            config=config,
            source=source,
            keep_inputs=keep_inputs,
            reservoir=reservoir,
            replacing=twins,
        )
    except BaseException:
        if exporter is not None:
            exporter.close(0)  # its metrics server, and its hold on the sink
        release(sink, 0)
        raise
    release(sink)  # the monitor (or its exporter) holds the sink now
    if exporter is not None:
        exporter.take_over(taken)
    # after the new monitor started: a watch() that fails leaves the old one watching
    _close_twins(monitor, twins)
    if recalibrate and pipeline is not None:
        from bnwatch.triggers import RecalibrateAction, Trigger, TriggerPolicy

        policy = recalibrate if isinstance(recalibrate, TriggerPolicy) else TriggerPolicy()
        pipeline.triggers.append(Trigger(RecalibrateAction(model, monitor), policy))
    return monitor


def _check_triggers(triggers: Sequence[Trigger]) -> tuple[Trigger, ...]:
    """``watch(triggers=)``: :class:`bnwatch.triggers.Trigger` objects only.  An action
    given as it is (a ``CallbackAction``, a ``WebhookAction``) would fail after every stored
    batch, and never act."""
    if not triggers:
        return ()
    from bnwatch.triggers import Trigger

    wrong: object = triggers  # one trigger (or action), not in a list
    if not isinstance(triggers, Trigger) and isinstance(triggers, Iterable):
        given = list(triggers)
        wrong = next((t for t in given if not isinstance(t, Trigger)), None)
        if wrong is None:
            return tuple(given)
    raise ConfigError(
        "triggers",
        type(wrong).__name__,
        "a list of bnwatch.triggers.Trigger objects: wrap an action in one, with the "
        "policy of when it acts, e.g. triggers=[Trigger(CallbackAction(fn), "
        "TriggerPolicy(...))]",
    )


def _twins(
    model: nn.Module, name: str, version: str, source: str, layers: Sequence[BatchNormLayer]
) -> list[Monitor]:
    """The open monitors a new one of ``name``, ``version`` and ``source`` on ``model``'s
    ``layers`` duplicates (same name, version and source on any of its layers, or on the
    model itself: watched again after its layers were replaced)."""
    ours = (name, version, source)
    found = dict.fromkeys([*watching(layer.module for layer in layers), *watching_model(model)])
    return [twin for twin in found if (twin.model_name, twin.version, twin.source) == ours]


def _close_twins(monitor: Monitor, twins: Sequence[Monitor]) -> None:
    """Close the open monitors that ``monitor`` duplicates (their hooks went when its came:
    :class:`Monitor`'s ``replacing``)."""
    for twin in twins:
        logger.warning(
            "bnwatch: %s@%s (source %s) was already watched by an open monitor of this "
            "process -- watch() run again? -- closing it (its last window goes to its sink) "
            "so that the traffic is not stored twice",
            monitor.model_name,
            monitor.version,
            monitor.source,
        )
        twin.close()


def report_recalibration(
    store: str,
    recalibration_id: int,
    result: RecalibrationResult | None = None,
    *,
    status: str | None = None,
    outcome: Mapping[str, Any] | None = None,
    token: str | None = None,
) -> RecalibrationInfo:
    """Report how a pending recalibration ended: the way back of a webhook trigger's receiver
    (the event's ``recalibration_id``) and of a recalibration requested from the dashboard.

    Either a ``result`` of :func:`bnwatch.recalibrate` says it:

    * ``applied`` -> ``applied``, with its new statistics (stored as references of kind
      ``recalibrated``, with their lineage) and ``result.summary()`` as the outcome;
    * ``rejected`` (held-out data did not improve), or not applied and judged not better ->
      ``rejected`` with the summary;
    * computed but neither applied nor judged, or rolled back -> :class:`ConfigError`: apply
      it (``result.apply()``) or pass ``status=`` instead;

    or an explicit ``status`` (``applied``, ``rejected`` or ``failed``) and ``outcome``, e.g.
    ``status="failed", outcome={"error": str(err)}``.

    A recalibration is finished once, in one transaction, all or nothing: reporting one that
    is no longer pending raises, and so do new statistics of a layer the store does not hold
    for the model version or with another channel count (recalibrate only the watched layers:
    ``bnwatch.recalibrate(..., layers=...)``) -- and nothing is stored.

    Args:
        store: where the recalibration is recorded: a SQLAlchemy URL (``sqlite:///bnwatch.db``,
            ``postgresql://user@host/db``), or the URL of a bnwatch service (``http://...``,
            ``POST /api/v1/recalibrations/{id}/outcome``).
        recalibration_id: the recalibration's id (``event["recalibration_id"]`` of a webhook).
        result: what :func:`bnwatch.recalibrate` returned.
        status: instead of ``result``: ``applied``, ``rejected`` or ``failed``.
        outcome: with ``status``: what happened (a JSON object); with ``result``: entries
            added to its summary (e.g. where the buffers were written).
        token: the service's API token when ``store`` is a service URL (default
            ``$BNWATCH_API_TOKEN``); not allowed with any other ``store``.

    Returns:
        The recalibration as stored now (:class:`bnwatch.store.repository.RecalibrationInfo`).

    Raises:
        ConfigError: an argument is invalid (before anything is sent or written).
        bnwatch.errors.RecalibrationNotFoundError, bnwatch.errors.RecalibrationStateError,
        bnwatch.errors.RecalibrationBuffersError: with a database ``store``: no such
            recalibration; it is no longer pending (its status is named); new statistics
            that do not fit the stored layers (the layer and the counts are named).
        bnwatch.client.ServiceError: with a service ``store``: unreachable, or the report was
            refused -- the HTTP status (404, 409, 422, ...) and the service's message say why.
    """
    check_positive_int("recalibration_id", recalibration_id)
    service = is_service_url(store)
    if not isinstance(store, str) or not store.strip():
        raise ConfigError("store", store, "a database URL or a bnwatch service URL")
    if token is not None and not service:
        raise ConfigError("token", "<hidden>", "None unless store is an http(s):// service URL")
    if outcome is not None and not isinstance(outcome, Mapping):
        raise ConfigError("outcome", type(outcome).__name__, "a mapping (a JSON object) or None")
    final, details, buffers = _reported(result, status, outcome)
    if service:
        from pydantic import TypeAdapter

        from bnwatch.client import send_recalibration_outcome
        from bnwatch.store.repository import RecalibrationInfo

        answer = send_recalibration_outcome(
            store, recalibration_id, status=final, outcome=details, buffers=buffers, token=token
        )
        return TypeAdapter(RecalibrationInfo).validate_python(answer)
    from bnwatch.store.migrate import engine_for
    from bnwatch.store.repository import Repository

    engine = engine_for(store, create=False)
    try:
        return Repository(engine).finish_recalibration(
            recalibration_id,
            status=final,
            outcome=details,
            buffers=buffers,
            unknown_layers="error",
        )
    finally:
        engine.dispose()


def _reported(
    result: RecalibrationResult | None, status: str | None, outcome: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any], dict[str, tuple[Any, Any, float]] | None]:
    """``(status, outcome, buffers)`` of a report (see :func:`report_recalibration`)."""
    from bnwatch.recalibration import RecalibrationResult

    if result is None:
        if status is None:
            raise ConfigError(
                "status", None, f"one of {list(REPORTED_STATUSES)} when no result is given"
            )
        if status not in REPORTED_STATUSES:
            raise ConfigError("status", status, f"one of {list(REPORTED_STATUSES)}")
        return status, dict(outcome or {}), None
    if not isinstance(result, RecalibrationResult):
        raise ConfigError(
            "result", type(result).__name__, "a RecalibrationResult from bnwatch.recalibrate()"
        )
    if status is not None:
        raise ConfigError("status", status, "None when a result is given (its status decides)")
    details = {**result.summary(), **(outcome or {})}
    if result.status == "applied":
        buffers = {
            u.name: (
                u.new_mean.detach().double().cpu().numpy(),
                u.new_var.detach().double().cpu().numpy(),
                float(u.module.eps),
            )
            for u in result.updates
        }
        return "applied", details, buffers
    if result.status == "rejected" or (result.status == "pending" and result.improved is False):
        return "rejected", details, None
    if result.status == "rolled_back":
        raise ConfigError(
            "result",
            "a rolled-back result",
            "an applied or rejected result: its statistics were applied and taken back, so "
            "pass status= ('rejected' or 'failed') and outcome= saying why instead",
        )
    judged = "judged better" if result.improved else "not judged (no held_out data)"
    raise ConfigError(
        "result",
        f"a result computed but not applied ({judged})",
        "an applied or rejected result: call result.apply() first (or recalibrate with "
        "apply=True or 'if_better'), or pass status= and outcome= instead",
    )
