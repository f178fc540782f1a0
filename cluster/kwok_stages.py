"""kwok pod lifecycle with a start-up delay: model servers are not Ready the moment they are bound.

kwok's built-in pod stages mark a bound pod Running and Ready in the same instant. An inference
pod loads gigabytes of weights first (tens of seconds to minutes), so on a real cluster the
writes a pod's start causes (kubelet status, ReplicaSet/Deployment/EndpointSlice status, the
InferenceService's status) come well after its bind. ``pod_stages(delay_s)`` gives kwok the same
two transitions it uses by default, "ready" and "delete", with the ready one delayed; kwok
replaces its default pod stages with any pod stages in its ``--config`` file (node stages stay
the defaults). Pods of Jobs never complete under these stages; Berth runs none.
"""

import yaml

STAGE_API = "kwok.x-k8s.io/v1alpha1"

# Mirrors kwok's "fast" pod-ready status: every container running and ready, IPs from kwok.
READY_STATUS = """\
{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: ContainersReady
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
{{ range .spec.readinessGates }}
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: {{ .conditionType | Quote }}
{{ end }}
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
phase: Running
startTime: {{ $now | Quote }}
"""


def pod_stages(ready_delay_s: float) -> str:
    """The kwok config (YAML documents) for pods that turn Ready ``ready_delay_s`` after binding."""
    if ready_delay_s < 0:
        raise ValueError(f"pod ready delay must be >= 0 seconds, got {ready_delay_s}")
    delay_ms = int(ready_delay_s * 1000)
    ready = {
        "apiVersion": STAGE_API,
        "kind": "Stage",
        "metadata": {"name": "pod-ready"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {
                "matchExpressions": [
                    {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
                    {"key": ".status.podIP", "operator": "DoesNotExist"},
                ]
            },
            # A tenth of jitter so that thousands of pods bound in one second do not all start
            # in the same second either.
            "delay": {
                "durationMilliseconds": delay_ms,
                "jitterDurationMilliseconds": delay_ms + delay_ms // 10,
            },
            "next": {"statusTemplate": READY_STATUS},
        },
    }
    delete = {
        "apiVersion": STAGE_API,
        "kind": "Stage",
        "metadata": {"name": "pod-delete"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {
                "matchExpressions": [
                    {"key": ".metadata.deletionTimestamp", "operator": "Exists"},
                ]
            },
            "next": {"finalizers": {"empty": True}, "delete": True},
        },
    }
    return yaml.safe_dump_all([ready, delete], sort_keys=False)
