"""Status conditions computed from what the service's children show."""

from berth.operator.status import (
    ApplyFailure,
    DeploymentSummary,
    PodSummary,
    ServiceView,
    service_status,
    summarize_pod,
)

NOW = "2026-11-22T22:00:00Z"


def pod(
    name: str, bound: bool = True, ready: bool = True, unschedulable: str | None = None
) -> PodSummary:
    return PodSummary(
        name, bound, ready, standby=False, terminating=False, unschedulable=unschedulable
    )


def view(pods: list[PodSummary], desired: int = 2, rendered: int = 3) -> ServiceView:
    deployment = DeploymentSummary(rendered, 5, 5, len(pods), len(pods), sum(p.ready for p in pods))
    return ServiceView(3, desired, "http://x", "sel", deployment, pods)


def conditions(status: dict) -> dict[str, tuple[str, str]]:  # type: ignore[type-arg]
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_all_ready_and_placed() -> None:
    status = service_status(view([pod("a"), pod("b")]), None, NOW)
    assert conditions(status) == {
        "Ready": ("True", "ReplicasReady"),
        "Scheduled": ("True", "AllPodsPlaced"),
        "Progressing": ("False", "RolloutComplete"),
    }
    assert status["observedGeneration"] == 3 and status["readyReplicas"] == 2
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_a_pod_that_fits_nowhere_makes_scheduled_false_with_the_scheduler_reason() -> None:
    stuck = pod("b", bound=False, ready=False, unschedulable="0/32 GPUs fit: needs 40.0 GiB")
    status = service_status(view([pod("a"), stuck]), None, NOW)
    assert conditions(status)["Scheduled"] == ("False", "NoGpuFits")
    assert conditions(status)["Ready"] == ("False", "Unschedulable")
    assert "needs 40.0 GiB" in status["conditions"][1]["message"]


def test_a_new_generation_is_progressing_until_rendered() -> None:
    status = service_status(view([pod("a"), pod("b")], rendered=2), None, NOW)
    assert conditions(status)["Progressing"] == ("True", "RollingOut")
    assert status["observedGeneration"] == 2


def test_refused_objects_become_invalid_spec() -> None:
    v = view([])
    v.render_error = ApplyFailure("InvalidSpec", "Deployment.apps is invalid: bad fieldPath")
    status = service_status(v, None, NOW)
    assert conditions(status)["Ready"] == ("False", "InvalidSpec")
    assert conditions(status)["Scheduled"] == ("False", "InvalidSpec")
    assert status["observedGeneration"] == 3  # this generation is done with: it never applies


def test_a_failure_that_is_retried_says_what_failed_and_leaves_the_rest_observed() -> None:
    v = view([pod("a"), pod("b")], rendered=2)
    v.render_error = ApplyFailure("Forbidden", "applying Deployment x: 403 Forbidden; retrying")
    status = service_status(v, None, NOW)
    assert conditions(status)["Ready"] == ("False", "Forbidden")
    assert "403" in status["conditions"][0]["message"]
    assert conditions(status)["Scheduled"] == ("True", "AllPodsPlaced")
    assert status["observedGeneration"] == 2  # generation 3 is not applied yet


def test_fields_not_acted_on_get_a_condition_naming_them_and_none_otherwise() -> None:
    v = view([pod("a"), pod("b")])
    assert "FieldsNotActedOn" not in conditions(service_status(v, None, NOW))
    v.not_acted_on = ("spec.autoscaling", "spec.sandbox.egress")
    status = service_status(v, None, NOW)
    assert conditions(status)["FieldsNotActedOn"] == ("True", "NotImplemented")
    (condition,) = [c for c in status["conditions"] if c["type"] == "FieldsNotActedOn"]
    assert "spec.autoscaling, spec.sandbox.egress" in condition["message"]


def test_egress_hosts_in_no_network_policy_get_a_condition_and_none_otherwise() -> None:
    v = view([pod("a"), pod("b")])
    assert "HostsNotInNetworkPolicy" not in conditions(service_status(v, None, NOW))
    v.hosts_note = "egress to api.example.com: ..."
    status = service_status(v, None, NOW)
    assert conditions(status)["HostsNotInNetworkPolicy"] == ("True", "NoFqdnPolicyEngine")
    assert status["conditions"][-1]["message"] == v.hosts_note


def test_transition_time_holds_while_the_status_holds() -> None:
    first = service_status(view([pod("a"), pod("b")]), None, "2026-01-01T00:00:00Z")
    again = service_status(view([pod("a"), pod("b")]), first, NOW)
    assert [c["lastTransitionTime"] for c in again["conditions"]] == ["2026-01-01T00:00:00Z"] * 3
    flipped = service_status(view([pod("a"), pod("b", ready=False)]), first, NOW)
    ready = next(c for c in flipped["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == NOW


def test_a_service_whose_pods_do_not_exist_yet_is_not_scheduled() -> None:
    status = service_status(view([]), None, NOW)
    assert conditions(status)["Scheduled"] == ("False", "Pending")
    scaled_to_zero = service_status(view([], desired=0), None, NOW)
    assert conditions(scaled_to_zero)["Scheduled"] == ("True", "AllPodsPlaced")


def test_the_url_is_published_only_while_a_replica_is_ready() -> None:
    starting = service_status(view([pod("a", ready=False)]), None, NOW)
    assert starting["url"] is None
    serving = service_status(view([pod("a", ready=False), pod("b")]), starting, NOW)
    assert serving["url"] == "http://x"


def kubelet_pod(*statuses: dict, init: tuple[dict, ...] = ()) -> dict:  # type: ignore[type-arg]
    """A pod as the API server returns it, with the kubelet's container statuses."""
    return {
        "metadata": {"name": "p"},
        "spec": {"nodeName": "node"},
        "status": {"containerStatuses": list(statuses), "initContainerStatuses": list(init)},
    }


BUDGET_ERROR = "loading the model failed: BudgetTooSmall: the GPU memory request of 0.12 GiB cannot"


def test_a_crash_looping_runtime_is_named_with_its_termination_message() -> None:
    crashing = {
        "name": "runtime",
        "ready": False,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
        "lastState": {"terminated": {"exitCode": 1, "message": BUDGET_ERROR}},
    }
    summary = summarize_pod(kubelet_pod(crashing))
    assert summary.failing == f"container runtime exited 1: {BUDGET_ERROR}"
    status = service_status(view([pod("a"), summary]), None, NOW)
    assert conditions(status)["Ready"] == ("False", "RuntimeFailing")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == f"1/2 replicas ready; pod p: {summary.failing}"


def test_an_image_that_cannot_be_pulled_or_a_failed_fetch_is_named() -> None:
    pulling = {"name": "runtime", "ready": False,
               "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "image not present"}}}  # fmt: skip
    assert summarize_pod(kubelet_pod(pulling)).failing == (
        "container runtime ErrImageNeverPull: image not present"
    )
    fetch = {"name": "fetch-model", "ready": False,
             "state": {"terminated": {"exitCode": 2, "message": "HTTP 404 for https://x/m.tar.gz"}}}  # fmt: skip
    waiting = {
        "name": "runtime",
        "ready": False,
        "state": {"waiting": {"reason": "PodInitializing"}},
    }
    assert summarize_pod(kubelet_pod(waiting, init=(fetch,))).failing == (
        "container fetch-model exited 2: HTTP 404 for https://x/m.tar.gz"
    )


def test_a_starting_or_recovered_runtime_is_not_failing() -> None:
    starting = {
        "name": "runtime",
        "ready": False,
        "state": {"waiting": {"reason": "ContainerCreating"}},
    }
    loading = {"name": "runtime", "ready": False, "state": {"running": {}}}
    recovered = {"name": "runtime", "ready": True, "state": {"running": {}},
                 "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}  # fmt: skip
    for status in (starting, loading, recovered):
        assert summarize_pod(kubelet_pod(status)).failing is None
    # Crashed once and starting again (not ready yet): still named, with the kubelet's reason.
    restarted = {**loading, "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
    assert (
        summarize_pod(kubelet_pod(restarted)).failing == "container runtime exited 137: OOMKilled"
    )


def test_a_long_termination_message_is_cut() -> None:
    long = {"name": "runtime", "ready": False,
            "state": {"terminated": {"exitCode": 1, "message": "x" * 5000}}}  # fmt: skip
    failing = summarize_pod(kubelet_pod(long)).failing
    assert failing is not None and len(failing) < 1100 and failing.endswith(" ...")


def test_scaling_active_mirrors_the_autoscalers_last_decision_while_it_runs() -> None:
    v = view([pod("a"), pod("b")])
    v.last_decision = {"reason": "MetricsStale", "message": "no reading for 30 s: held"}
    assert "ScalingActive" not in conditions(service_status(v, None, NOW))  # not autoscaled
    v.autoscaled = True
    status = service_status(v, None, NOW)
    assert conditions(status)["ScalingActive"] == ("False", "MetricsStale")
    (scaling,) = [c for c in status["conditions"] if c["type"] == "ScalingActive"]
    assert scaling["message"] == "no reading for 30 s: held"
    v.last_decision = {"reason": "ScaledUp", "message": "3 in flight: 2 replicas"}
    assert conditions(service_status(v, None, NOW))["ScalingActive"] == ("True", "ScaledUp")
    v.last_decision = None
    assert "ScalingActive" not in conditions(service_status(v, None, NOW))  # no decision yet
