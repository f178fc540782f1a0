/* Berth's egress enforcer: the map layouts shared by egress.c and runtime/agent/egress_policy.py.
 *
 * Every key starts with the id of the sandboxed cgroup (the one the programs are attached to),
 * so one set of maps serves every sandboxed pod on the node. Addresses and ports are in network
 * byte order, as the kernel hands them to cgroup/connect* and cgroup/sendmsg* programs.
 */
#ifndef BERTH_EGRESS_H
#define BERTH_EGRESS_H

#include <linux/types.h>

#define BERTH_MAX_SANDBOXES 4096
#define BERTH_MAX_PREFIXES 65536
#define BERTH_MAX_PORTS 65536
/* Deepest cgroup level searched for a sandbox (a pod's container sits at about 5). */
#define BERTH_MAX_LEVELS 32

/* Which hook refused: index into struct sandbox's counters. */
enum berth_hook { HOOK_CONNECT4 = 0, HOOK_CONNECT6 = 1, HOOK_SENDMSG4 = 2, HOOK_SENDMSG6 = 3, HOOKS = 4 };

/* sandboxes: cgroup id -> denial counters. A cgroup with an entry is sandboxed (default deny). */
struct sandbox {
	__u64 denied[HOOKS];
};

/* allow4 / allow6: LPM tries. prefixlen counts bits of cgroup_id (always all 64) plus the
 * CIDR's prefix; the id is two native-order words so the key has no padding. */
struct allow4_key {
	__u32 prefixlen;
	__u32 cgroup_id[2];
	__u32 addr;
};

struct allow6_key {
	__u32 prefixlen;
	__u32 cgroup_id[2];
	__u32 addr[4];
};

/* What an allowed prefix permits: the (protocol, port) pairs of one port set of its sandbox. */
struct allow {
	__u32 port_set;
};

/* ports: (sandbox, port set, port in host order, IPPROTO_TCP or IPPROTO_UDP) -> 1; port
 * BERTH_ANY_PORT allows every port of that protocol. */
#define BERTH_ANY_PORT 0
struct port_key {
	__u64 cgroup_id;
	__u32 port_set;
	__u16 port;
	__u8 protocol;
	__u8 pad;
};

#endif
