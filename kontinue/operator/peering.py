"""kopf's peering for `kontinue operator`: exactly one active replica, never a silent standalone.

The operator always peers through one cluster-scoped `ClusterKopfPeering` named by `--peering`,
whether it watches every namespace or only some (`-n`): one object, so a namespace that appears
later (a glob) never lacks one. It creates that object at startup when it is missing, so that
`kubectl apply -f crds/ -f deploy/operator.yaml` works in one go (kubectl cannot create an object
of a CRD applied in the same command). With kopf 1.45.2 a peering name makes the peering mandatory,
and a mandatory peering whose object is missing pauses the operator forever, logging nothing above
DEBUG; a missing CRD does the same. Here neither can happen unnoticed: the operator creates the
object, or, when it cannot (CRD missing, no permission), fails its startup with the reason after
about a minute of retries and exits non-zero.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException

GROUP, VERSION, PLURAL, KIND = "kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering"
RETRIES, BACKOFF = 12, 5.0  # startup gives up after about a minute
log = logging.getLogger("kontinue.operator")


def ensure_peering(api: client.ApiClient, name: str) -> bool:
    """Create the ClusterKopfPeering `name` unless it exists; True when this call created it.

    Raises kopf.TemporaryError with the reason when it can be neither read nor created."""
    custom = client.CustomObjectsApi(api)
    try:
        custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        return False
    except ApiException as error:
        if error.status != 404:
            raise _failure(name, "read", error) from None
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name}}
    try:
        custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
    except ApiException as error:
        if error.status == 409:  # another replica created it in between
            return False
        raise _failure(name, "create", error) from None
    log.info("created the %s %r (kopf's peering: one active replica)", KIND, name)
    return True


def _failure(name: str, verb: str, error: ApiException) -> kopf.TemporaryError:
    if error.status == 404:
        why = (f"the {KIND} CRD ({PLURAL}.{GROUP}) is not installed: apply deploy/operator.yaml "
               "(or the chart's crds/), or run with --standalone")
    elif error.status == 403:
        why = (f"the operator may not {verb} {PLURAL}.{GROUP} (its ClusterRole needs get, list, watch, "
               "patch and create on them)")
    else:
        why = f"{error.status} {error.reason}"
    return kopf.TemporaryError(f"cannot {verb} the {KIND} {name!r}: {why}", delay=BACKOFF)


def register(name: str, api: Callable[[], client.ApiClient | None]) -> None:
    """A kopf startup handler: cluster-wide, mandatory peering through the ClusterKopfPeering `name`,
    created if missing. `api` returns the operator's ApiClient."""

    @kopf.on.startup(id="kontinue-peering", retries=RETRIES, backoff=BACKOFF)
    def peering(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.clusterwide = True  # also for an operator of some namespaces: one object
        settings.peering.mandatory = True
        settings.peering.name = name
        ensure_peering(api(), name)
