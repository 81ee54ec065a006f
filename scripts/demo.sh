#!/usr/bin/env bash
# make demo: the whole first boot of a gateway on a software TPM and the emulator.
#   1. a private swtpm, and the emulator (DPS + IoT Hub) with its factory CA;
#   2. the factory line: key inside the TPM, CSR, certificate from the factory CA, install;
#   3. `unicity run` provisions through DPS, which issues an operational certificate for a new
#      TPM key (a credential policy on the factory enrollment), and connects to the assigned
#      hub with it;
#   4. a telemetry message sent through the agent arrives in the emulator, which counts one
#      DPS registration and names the hub by a loopback address of its own, without a port;
#   5. the operational certificate, valid for seconds only here, is renewed through the hub at
#      renew_at (80 %) of its lifetime: a new TPM key, a new certificate, the old key destroyed.
# Everything lives in a temporary directory, removed on exit with the processes it started.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${BIN:-$root/bin}
unicity=$bin/unicity
emulator=$bin/unicity-emulator
for tool in "$unicity" "$emulator"; do
	[ -x "$tool" ] || { echo "demo: $tool is missing; run 'make build'" >&2; exit 1; }
done
command -v swtpm >/dev/null || { echo "demo: swtpm is not installed (apt-get install swtpm)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/unicity-demo.XXXXXX")
pids=()
cleanup() {
	local i
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill "${pids[i]}" 2>/dev/null || true
		wait "${pids[i]}" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# await WHAT COMMAND...: until COMMAND succeeds (checked every 0.1 s, for 60 s at most), or the
# agent dies.
await() {
	local what=$1 i
	shift
	for ((i = 0; i < 600; i++)); do
		"$@" && return 0
		kill -0 "$agent" 2>/dev/null || { echo "demo: the agent exited" >&2; cat "$work/agent.log" >&2; exit 1; }
		sleep 0.1
	done
	echo "demo: no $what after 60 s" >&2
	cat "$work/agent.log" >&2
	exit 1
}

# wait_for PHASE: until the agent's status file shows it.
wait_for() { await "'$1'" grep -qs "\"phase\":\"$1\"" "$work/run/status.json"; }

# thumbprint KEY: the value of KEY (sha256_thumbprint, replaced) in the agent's renewed line.
thumbprint() { sed -n "s/.*event=renewed .*$1=\([0-9A-F]*\).*/\1/p" "$work/agent.log" | head -n 1; }

step "software TPM"
mkdir -p "$work/tpm"
swtpm socket --tpm2 --tpmstate dir="$work/tpm" \
	--server type=unixio,path="$work/tpm/sock" --ctrl type=unixio,path="$work/tpm/sock.ctrl" \
	--flags not-need-init,startup-clear 2>"$work/swtpm.log" &
pids+=($!)
for ((i = 0; i < 100; i++)); do [ -S "$work/tpm/sock" ] && break; sleep 0.05; done
tpm="swtpm:$work/tpm/sock"
echo "swtpm at $tpm"

step "emulator: DPS and IoT Hub"
"$emulator" init --dir "$work/emu"
mkfifo "$work/serve.out"
"$emulator" serve --dir "$work/emu" >"$work/serve.out" 2>"$work/emulator.log" &
pids+=($!)
read -r serve <"$work/serve.out"
echo "$serve"
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" <<<"$serve"; }
id_scope=$(field id_scope)
dps=$(field dps)
hub=$(field hub)
trust_bundle=$(field trust_bundle)

step "factory line: key in the TPM, CSR, certificate, install"
cd "$work"
identity_key=tpmkey:identity.key
"$unicity" factory keygen --tpm "$tpm" --out identity.key
"$unicity" factory csr --tpm "$tpm" --key "$identity_key" --cn demo-gw-01 --out identity.csr
"$emulator" sign --dir "$work/emu" --csr identity.csr --out identity-cert.pem
"$unicity" factory install --tpm "$tpm" --key "$identity_key" --cert identity-cert.pem --out identity.pem

# Azure's policies issue for 7 to 90 days; 8 seconds here, so that the demo sees a renewal.
step "credential policy: DPS issues 8-second operational certificates to the factory's devices"
"$emulator" policy --dir "$work/emu" --group factory --validity 8s

cat >config.toml <<CONFIG
[provisioning]
global_endpoint = "$dps"
id_scope = "$id_scope"

[attestation]
identity_cert = "$work/identity.pem"
identity_key = "$identity_key"

[tpm]
device = "$tpm"

[tls]
trust_bundle = "$trust_bundle"

[state]
dir = "$work/state"

[runtime]
dir = "$work/run"

[certificates]
issuance = "dps"
CONFIG
echo "config: $work/config.toml"

step "first boot: unicity run"
"$unicity" run --config config.toml 2>"$work/agent.log" &
agent=$!
pids+=("$agent")
wait_for connected
sed 's/^/  agent: /' "$work/agent.log"
"$unicity" status --config config.toml

step "telemetry through the agent"
echo '{"temperature":21.5,"humidity":40}' |
	"$unicity" send --config config.toml --property site=demo --property kind=climate
"$emulator" telemetry --dir "$work/emu" --device demo-gw-01 --wait 1 --timeout 30s

step "DPS: one registration; the hub is named without a port, as Azure names hubs"
"$emulator" registrations --dir "$work/emu" --device demo-gw-01

step "renewal: at 80 % of its lifetime the agent asks the hub for a certificate for a new TPM key"
await "renewed certificate" grep -q "event=renewed" "$work/agent.log"
grep -e "event=renewed" "$work/agent.log" | head -n 1 | sed 's/^/  agent: /'
echo "operational certificate before: $(thumbprint replaced)"
echo "operational certificate after:  $(thumbprint sha256_thumbprint)"
"$emulator" devices --dir "$work/emu"

step "done: device demo-gw-01 provisioned on $hub, connected with its operational certificate, telemetry delivered, the certificate renewed through the hub"
