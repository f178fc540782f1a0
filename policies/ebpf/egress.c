// SPDX-License-Identifier: Apache-2.0
/* Berth's egress enforcer: cgroup sock_addr programs that refuse (EPERM) every destination a
 * sandboxed pod's allowlist does not name.
 *
 * The programs are attached to each sandboxed pod's cgroup v2 directory; a process deeper down
 * (a container, a `kubectl exec`) finds its sandbox by walking its ancestors from the root and
 * keeping the deepest one with an entry in `sandboxes`. connect4/6 cover TCP and connected UDP;
 * sendmsg4/6 cover UDP sendto() without connect(). An IPv4-mapped IPv6 address (::ffff:a.b.c.d)
 * arrives at connect6 and is judged by the IPv4 allowlist, so a dual-stack socket cannot reach a
 * v4 address the v4 allowlist refuses (a mapped UDP sendto arrives at sendmsg4 on Linux 6.18;
 * sendmsg6 judges mapped ones the same way should a kernel send one there). Returning 0 makes
 * the system call fail with EPERM.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "egress.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BERTH_MAX_SANDBOXES);
	__type(key, __u64);
	__type(value, struct sandbox);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sandboxes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, BERTH_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct allow4_key);
	__type(value, struct allow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} allow4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, BERTH_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct allow6_key);
	__type(value, struct allow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} allow6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BERTH_MAX_PORTS);
	__type(key, struct port_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ports SEC(".maps");

/* The deepest ancestor (or self) of the caller's cgroup that is sandboxed; 0 if none. Walking
 * down from the root ends at the caller's level (deeper levels answer 0); walking up from
 * BERTH_MAX_LEVELS to stop at the first hit measured slower (about 255 vs 200 ns per connect4
 * for a container below its pod), the helper calls for empty levels costing more than lookups.
 * Remembering each caller cgroup's sandbox in an LRU map measured about 150 ns: not worth a cache
 * whose entries could go stale. */
static __always_inline __u64 find_sandbox(void)
{
	__u64 found = 0;

	for (int level = 0; level < BERTH_MAX_LEVELS; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		if (id == 0)
			break;
		if (bpf_map_lookup_elem(&sandboxes, &id))
			found = id;
	}
	return found;
}

static __always_inline int port_allowed(__u64 cgroup_id, struct allow *allow,
					struct bpf_sock_addr *ctx)
{
	struct port_key key = {
		.cgroup_id = cgroup_id,
		.port_set = allow->port_set,
		.port = bpf_ntohs((__u16)ctx->user_port),
		.protocol = (__u8)ctx->protocol,
	};

	if (bpf_map_lookup_elem(&ports, &key))
		return 1;
	key.port = BERTH_ANY_PORT;
	return bpf_map_lookup_elem(&ports, &key) != NULL;
}

static __always_inline int allowed4(__u64 cgroup_id, __u32 addr, struct bpf_sock_addr *ctx)
{
	struct allow4_key key = {
		.prefixlen = 64 + 32,
		.cgroup_id = { (__u32)cgroup_id, (__u32)(cgroup_id >> 32) },
		.addr = addr,
	};
	struct allow *allow = bpf_map_lookup_elem(&allow4, &key);

	return allow && port_allowed(cgroup_id, allow, ctx);
}

static __always_inline int allowed6(__u64 cgroup_id, struct bpf_sock_addr *ctx)
{
	struct allow6_key key = {
		.prefixlen = 64 + 128,
		.cgroup_id = { (__u32)cgroup_id, (__u32)(cgroup_id >> 32) },
	};
	struct allow *allow;

	key.addr[0] = ctx->user_ip6[0];
	key.addr[1] = ctx->user_ip6[1];
	key.addr[2] = ctx->user_ip6[2];
	key.addr[3] = ctx->user_ip6[3];
	if (key.addr[0] == 0 && key.addr[1] == 0 && key.addr[2] == bpf_htonl(0xffff))
		return allowed4(cgroup_id, key.addr[3], ctx);
	allow = bpf_map_lookup_elem(&allow6, &key);
	return allow && port_allowed(cgroup_id, allow, ctx);
}

static __always_inline int verdict(__u64 cgroup_id, int allowed, enum berth_hook hook)
{
	struct sandbox *sandbox;

	if (allowed)
		return 1;
	sandbox = bpf_map_lookup_elem(&sandboxes, &cgroup_id);
	if (sandbox)
		__sync_fetch_and_add(&sandbox->denied[hook], 1);
	return 0;
}

static __always_inline int judge4(struct bpf_sock_addr *ctx, enum berth_hook hook)
{
	__u64 cgroup_id = find_sandbox();

	if (cgroup_id == 0)
		return 1;
	return verdict(cgroup_id, allowed4(cgroup_id, ctx->user_ip4, ctx), hook);
}

static __always_inline int judge6(struct bpf_sock_addr *ctx, enum berth_hook hook)
{
	__u64 cgroup_id = find_sandbox();

	if (cgroup_id == 0)
		return 1;
	return verdict(cgroup_id, allowed6(cgroup_id, ctx), hook);
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	return judge4(ctx, HOOK_CONNECT4);
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	return judge6(ctx, HOOK_CONNECT6);
}

SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	return judge4(ctx, HOOK_SENDMSG4);
}

SEC("cgroup/sendmsg6")
int sendmsg6(struct bpf_sock_addr *ctx)
{
	return judge6(ctx, HOOK_SENDMSG6);
}
