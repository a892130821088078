"""`kontinue operator`: runs the kopf operator for TrainingRuns and TransferRuns."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("kontinue.operator")
WORKERS = 16  # kopf's threads for the (synchronous) handlers
# The API server stores objects nested up to 10,000 levels deep (spec.hyperparameters is free-form,
# so no schema bounds it), while Python's json gives up at the recursion limit (1,000 by default):
# kopf's watch stream would die on one such run and take the operator, and every run, with it.
API_SERVER_MAX_DEPTH = 10_000
RECURSION_LIMIT = 4 * API_SERVER_MAX_DEPTH  # a few frames per level (decoding, copying, validating)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("operator", help="run the operator (watches TrainingRuns and TransferRuns, runs their trainer pods)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="namespace to watch (repeatable; globs allowed); default: all namespaces")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    parser.add_argument("--image", default=os.environ.get("KONTINUE_TRAINER_IMAGE"),
                        help="trainer image for runs that name none (env KONTINUE_TRAINER_IMAGE)")
    parser.add_argument("--allowed-images", default=os.environ.get("KONTINUE_ALLOWED_IMAGES", ""),
                        help="comma-separated globs (fnmatch: * also matches /) of the images a run's spec.image may "
                             "name, such as 'registry.example/kontinue:*'; a run naming another fails with "
                             "ImageNotAllowed. The --image is always allowed; default: only it "
                             "(env KONTINUE_ALLOWED_IMAGES)")
    parser.add_argument("--grace-seconds", type=int, default=120,
                        help="terminationGracePeriodSeconds of trainer pods: time for the SIGTERM checkpoint")
    parser.add_argument("--node-lost-seconds", type=int, default=60,
                        help="seconds a trainer pod tolerates its node not reporting before it is evicted, and "
                             "then stays Terminating past its grace period before it is deleted for good "
                             "(the run resumes on another node)")
    parser.add_argument("--image-pull-timeout", type=float, default=300.0,
                        help="seconds a pod may fail to pull its image before the attempt counts as failed")
    parser.add_argument("--backoff-seconds", type=float, default=10.0,
                        help="first retry delay after a failed attempt; doubles with each failure")
    parser.add_argument("--backoff-max-seconds", type=float, default=600.0)
    parser.add_argument("--progress-seconds", type=float, default=10.0,
                        help="how often the status of a running run is refreshed from its trainer's log")
    parser.add_argument("--health-port", type=int, default=8080, help="liveness/readiness probe port (/healthz)")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0: off)")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true",
                         help="no peering: only for one replica you know is alone (tests, development)")
    peering.add_argument("--peering", default="kontinue",
                         help="kopf peering object that keeps exactly one replica active (default: kontinue)")
    parser.add_argument("--priority", type=int, default=100,
                        help="peering priority; give each replica a different one (equal priorities all pause)")
    parser.set_defaults(func=_operator)


def _operator(args: argparse.Namespace) -> int:
    import kopf
    from kubernetes import config as kube_config
    from kubernetes.client import ApiClient, Configuration
    from prometheus_client import start_http_server

    from kontinue.operator import handlers
    from kontinue.operator.reconcile import Settings, parse_allowed_images

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    defaults = Settings()
    configuration = Configuration.get_default_copy()
    configuration.connection_pool_maxsize = WORKERS + 4  # kopf's workers and the requeue timers
    handlers.RUNTIME.api = ApiClient(configuration)
    handlers.tick_every(args.progress_seconds)
    handlers.RUNTIME.settings = Settings(
        image=args.image or defaults.image, grace_seconds=args.grace_seconds, node_lost_seconds=args.node_lost_seconds,
        image_pull_timeout=args.image_pull_timeout, backoff_base=args.backoff_seconds,
        backoff_max=args.backoff_max_seconds, allowed_images=parse_allowed_images(args.allowed_images))
    log.info("trainer image %s; runs may name images matching %s", handlers.RUNTIME.settings.image,
             ", ".join(handlers.RUNTIME.settings.image_patterns()))

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_) -> None:
        settings.posting.enabled = False  # the operator posts its own Events, one per transition
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.watching.connect_timeout = 30
        settings.persistence.finalizer = "kontinue.dev/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kontinue.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kontinue.dev")
        settings.execution.max_workers = WORKERS

    if not args.standalone:  # one ClusterKopfPeering, created if missing (kontinue/operator/peering.py)
        from kontinue.operator import peering
        peering.register(args.peering, lambda: handlers.RUNTIME.api)

    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.run(
        standalone=args.standalone, peering_name=None if args.standalone else args.peering,
        priority=args.priority, clusterwide=not args.namespace, namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0
