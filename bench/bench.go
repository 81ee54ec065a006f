// Package bench measures what users of the unicity agent feel: it runs the built `unicity`
// binary against `unicity-emulator` on loopback and reports first and provisioned boot times,
// memory and CPU, TPM and wire work per boot, the time and TPM work of a renewal of the
// operational certificate, a fleet storm against a DPS quota and telemetry through the local
// API, each as the median of several runs. cmd/unicity-bench is its
// command line (`make bench`); docs are in bench/README.md.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/bench/proxy"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

// Options say what to run and how much of it.
type Options struct {
	// Bin holds the unicity and unicity-emulator binaries (make build's bin/).
	Bin string `json:"bin"`
	// Dist holds make cross's binaries, for the sizes per architecture; when it has none,
	// the size of Bin's unicity is reported for this machine's architecture.
	Dist string `json:"dist"`
	// Runs is how many times each boot is measured.
	Runs int `json:"runs"`
	// Idle is how long the connected agent is watched for memory and CPU.
	Idle time.Duration `json:"idle_ns"`
	// Fleet devices start within one second against a DPS quota of Quota registrations a
	// minute.
	Fleet int `json:"fleet"`
	Quota int `json:"quota_per_minute"`
	// Messages is the number of telemetry messages for each telemetry measurement.
	Messages int `json:"messages"`
	// TPM measures with swtpm too; without it the TPM figures are missing.
	TPM bool `json:"tpm"`
	// Work is the directory for keys, configurations and logs (kept); empty: a temporary
	// directory, removed at the end.
	Work string `json:"work,omitempty"`
	// Log receives progress lines.
	Log io.Writer `json:"-"`
}

// DefaultOptions is the full benchmark of `make bench`.
func DefaultOptions() Options {
	return Options{Bin: "bin", Dist: "dist", Runs: 5, Idle: time.Minute, Fleet: 2000, Quota: 1000, Messages: 500, TPM: true}
}

// ShortOptions is the CI variant: the same scenarios, smaller.
func ShortOptions() Options {
	return Options{Bin: "bin", Dist: "dist", Runs: 2, Idle: 5 * time.Second, Fleet: 50, Quota: 25, Messages: 50, TPM: true}
}

// The emulator's DPS timing for the boot scenarios: retry-after 1 s, assignment at once.
const (
	bootRetryAfter = time.Second
	// pollWait is what the client must wait before its poll by protocol: DPS allows 5 polls
	// per 10 s, so a client waits max(retry-after, 2 s) (protocol.md §2.6).
	pollWait    = 2 * time.Second
	bootTimeout = time.Minute
	// settle is how long after connected a boot's counters are read.
	settle = 500 * time.Millisecond
)

type harness struct {
	opts    Options
	work    string
	emuDir  string
	factory *pki.CA
	report  *Report
}

// Run runs every scenario and returns the report. A scenario that fails is recorded in
// Report.Failures and the others still run; the error is for what stops them all.
func Run(ctx context.Context, opts Options) (*Report, error) {
	if opts.Log == nil {
		opts.Log = io.Discard
	}
	if opts.Runs < 1 || opts.Messages < 1 || opts.Idle <= 0 {
		return nil, errors.New("runs, messages and idle must be positive")
	}
	h := &harness{opts: opts, report: &Report{Date: time.Now().UTC(), Options: opts}}
	h.report.Machine = machine()
	h.report.Machine.NProc = runtime.NumCPU()
	h.report.Machine.Go = runtime.Version()
	start := time.Now()
	for _, b := range []string{"unicity", "unicity-emulator"} {
		if _, err := os.Stat(filepath.Join(opts.Bin, b)); err != nil {
			return nil, fmt.Errorf("%s: %w (run make build)", filepath.Join(opts.Bin, b), err)
		}
	}
	version, err := exec.CommandContext(ctx, filepath.Join(opts.Bin, "unicity"), "version").Output()
	if err != nil {
		return nil, fmt.Errorf("unicity version: %w", err)
	}
	h.report.Agent = strings.TrimSpace(string(version))
	if h.work = opts.Work; h.work == "" {
		if h.work, err = os.MkdirTemp("", "unicity-bench-"); err != nil {
			return nil, err
		}
		defer os.RemoveAll(h.work)
	}
	h.emuDir = filepath.Join(h.work, "emu")
	if err := run(ctx, filepath.Join(opts.Bin, "unicity-emulator"), "init", "--dir", h.emuDir); err != nil {
		return nil, err
	}
	if h.factory, err = pki.LoadCA(filepath.Join(h.emuDir, "factory-ca.pem"), filepath.Join(h.emuDir, "factory-ca.key")); err != nil {
		return nil, fmt.Errorf("the emulator's factory CA: %w", err)
	}

	h.step("boots with a software key (file:)")
	if err := h.boots(ctx, "file"); err != nil {
		h.report.fail("boots with a software key", err)
	}
	if opts.TPM {
		h.step("boots with swtpm")
		if err := h.boots(ctx, "swtpm"); err != nil {
			h.report.fail("boots with swtpm", err)
		}
		h.step("boots with TPM attestation (swtpm's EK)")
		if err := h.boots(ctx, "tpm-attestation"); err != nil {
			h.report.fail("boots with TPM attestation", err)
		}
		h.step("renewals of the operational certificate (swtpm)")
		if err := h.renewals(ctx); err != nil {
			h.report.fail("renewals of the operational certificate", err)
		}
	}
	h.step("binary sizes")
	if err := h.sizes(); err != nil {
		h.report.fail("binary sizes", err)
	}
	h.step(fmt.Sprintf("fleet storm: %d devices, quota %d/min", opts.Fleet, opts.Quota))
	if err := h.storm(ctx); err != nil {
		h.report.fail("fleet storm", err)
	}
	h.report.Machine.Load += " → " + loadAvg()
	h.report.Elapsed = time.Since(start).Round(time.Second).String()
	return h.report, ctx.Err()
}

func (h *harness) step(s string) { fmt.Fprintf(h.opts.Log, "bench: %s\n", s) }

// device is one agent's files.
type device struct {
	name, dir, config, state, runtime string
}

// writeConfig writes the agent's configuration for d, reaching DPS through s's proxy.
// writeConfig writes d's configuration; attestation is the body of its [attestation] table.
func (h *harness) writeConfig(d *device, s *stack, attestation, tpm string) error {
	d.state, d.runtime = filepath.Join(d.dir, "state"), filepath.Join(d.dir, "run")
	d.config = filepath.Join(d.dir, "config.toml")
	cfg := fmt.Sprintf(`[provisioning]
global_endpoint = %q
id_scope = %q

[attestation]
%s
[tls]
trust_bundle = %q

[state]
dir = %q

[runtime]
dir = %q
`, s.dps.Addr(), s.info.IDScope, attestation, s.info.TrustBundle, d.state, d.runtime)
	if tpm != "" {
		cfg += fmt.Sprintf("\n[tpm]\ndevice = %q\n", tpm)
	}
	return os.WriteFile(d.config, []byte(cfg), 0o600)
}

// softwareDevice makes a device with a file: key and a certificate from the factory CA.
func (h *harness) softwareDevice(name string, s *stack) (*device, error) {
	d := &device{name: name, dir: filepath.Join(h.work, name)}
	if err := os.MkdirAll(d.dir, 0o700); err != nil {
		return nil, err
	}
	leaf, err := h.factory.NewDevice(name)
	if err != nil {
		return nil, err
	}
	cert, key := filepath.Join(d.dir, "identity.pem"), filepath.Join(d.dir, "identity.key")
	if err := certcodec.WriteCertificates(cert, leaf.Chain...); err != nil {
		return nil, err
	}
	if err := certcodec.WritePrivateKey(key, leaf.Key); err != nil {
		return nil, err
	}
	return d, h.writeConfig(d, s, x509Attestation(cert, "file:"+key), "")
}

// tpmDevice makes a device the way a factory line does (docs/oem.md): key in the TPM, CSR,
// certificate from the emulator's factory CA, install. The agent reaches the TPM through
// the counting proxy.
func (h *harness) tpmDevice(ctx context.Context, name string, s *stack, t *swtpm) (*device, error) {
	d := &device{name: name, dir: filepath.Join(h.work, name)}
	if err := os.MkdirAll(d.dir, 0o700); err != nil {
		return nil, err
	}
	unicity := filepath.Join(h.opts.Bin, "unicity")
	spec := "swtpm:" + t.socket
	key, csr := filepath.Join(d.dir, "identity.key"), filepath.Join(d.dir, "identity.csr")
	signed, cert := filepath.Join(d.dir, "signed.pem"), filepath.Join(d.dir, "identity.pem")
	for _, args := range [][]string{
		{unicity, "factory", "keygen", "--tpm", spec, "--out", key},
		{unicity, "factory", "csr", "--tpm", spec, "--key", key, "--cn", name, "--out", csr},
		{filepath.Join(h.opts.Bin, "unicity-emulator"), "sign", "--dir", h.emuDir, "--csr", csr, "--out", signed},
		{unicity, "factory", "install", "--tpm", spec, "--key", key, "--cert", signed, "--out", cert},
	} {
		if err := run(ctx, args[0], args[1:]...); err != nil {
			return nil, err
		}
	}
	return d, h.writeConfig(d, s, x509Attestation(cert, "tpmkey:"+key), "swtpm:"+t.proxy.Path())
}

func x509Attestation(cert, key string) string {
	return fmt.Sprintf("identity_cert = %q\nidentity_key = %q\n", cert, key)
}

// tpmAttestationDevice enrolls swtpm's endorsement key as docs/oem.md has it (`unicity
// factory ek`, then the enrollment); nothing else is made at the factory.
func (h *harness) tpmAttestationDevice(ctx context.Context, name string, s *stack, t *swtpm) (*device, error) {
	d := &device{name: name, dir: filepath.Join(h.work, name)}
	if err := os.MkdirAll(d.dir, 0o700); err != nil {
		return nil, err
	}
	ekFile := filepath.Join(d.dir, "ek.b64")
	out, err := exec.CommandContext(ctx, filepath.Join(h.opts.Bin, "unicity"), "factory", "ek", "--tpm", "swtpm:"+t.socket, "--out", ekFile, "--json").Output()
	if err != nil {
		return nil, fmt.Errorf("unicity factory ek: %w", err)
	}
	var ek struct {
		RegistrationID string `json:"registration_id"`
	}
	if err := json.Unmarshal(out, &ek); err != nil {
		return nil, fmt.Errorf("unicity factory ek: %w", err)
	}
	if err := run(ctx, filepath.Join(h.opts.Bin, "unicity-emulator"), "enroll", "--dir", h.emuDir, "--registration-id", ek.RegistrationID, "--tpm-ek", ekFile); err != nil {
		return nil, err
	}
	return d, h.writeConfig(d, s, "method = \"tpm\"\n", "swtpm:"+t.proxy.Path())
}

// bootSample is what one boot measured.
type bootSample struct {
	total, registered time.Duration // from process start
	// Where a first boot's time goes, from the agent's log: its first line (exec, runtime and
	// configuration), DPS from the registration's start until the poll wait (TCP, TLS,
	// CONNECT, SUBSCRIBE, register), and the hub from phase connecting to connected.
	firstLine, dpsSession, hubConnect time.Duration
	peakRSS                           int64
	dps, hub                          proxy.TCPCounts
	tpm                               proxy.TPMCounts
}

// boot starts the agent for d, waits until it is connected and measures; the agent is left
// running for the caller to stop. firstBoot expects a registration first.
func (h *harness) boot(ctx context.Context, s *stack, t *swtpm, d *device, logName string, firstBoot bool) (*agent, bootSample, error) {
	var b bootSample
	dps0, hub0 := s.dps.Counts(), s.hub.Counts()
	var tpm0 proxy.TPMCounts
	if t != nil {
		tpm0 = t.proxy.Counts()
	}
	a, err := h.startAgent(d, filepath.Join(d.dir, logName))
	if err != nil {
		return nil, b, err
	}
	fail := func(err error) (*agent, bootSample, error) {
		a.stop()
		return nil, b, err
	}
	if firstBoot {
		at, err := a.waitPhase(ctx, "connecting", bootTimeout)
		if err != nil {
			return fail(err)
		}
		b.registered = at.Sub(a.start)
	}
	at, err := a.waitPhase(ctx, "connected", bootTimeout)
	if err != nil {
		return fail(err)
	}
	b.total = at.Sub(a.start)
	b.firstLine, _ = a.firstLine(" ")
	if firstBoot {
		reg, ok1 := a.firstLine(`msg="registering `)
		wait, ok2 := a.firstLine(`msg="DPS is assigning a hub`)
		if ok1 && ok2 {
			b.dpsSession = wait - reg
		}
	}
	connecting, _ := a.firstLine("phase=connecting")
	b.hubConnect = b.total - connecting
	// The exchanges right after CONNACK (subscriptions, the twin) belong to the boot: give
	// them a moment before reading the counters and the peak memory.
	select {
	case <-time.After(settle):
	case <-ctx.Done():
		return fail(ctx.Err())
	}
	if b.peakRSS, _, err = memory(a.pid()); err != nil {
		return fail(err)
	}
	b.dps, b.hub = s.dps.Counts().Sub(dps0), s.hub.Counts().Sub(hub0)
	if t != nil {
		b.tpm = t.proxy.Counts().Sub(tpm0)
	}
	return a, b, nil
}

// boots measures first and provisioned boots with a key of the given kind ("file" or
// "swtpm"); with "file" it then measures the connected agent idle and its telemetry.
func (h *harness) boots(ctx context.Context, kind string) error {
	s, err := h.startStack(ctx, kind, "--retry-after", fmt.Sprint(int(bootRetryAfter/time.Second)), "--assign-delay", "0s")
	if err != nil {
		return err
	}
	defer s.close()
	var (
		t *swtpm
		d *device
	)
	if kind == "swtpm" || kind == "tpm-attestation" {
		if t, err = h.startSWTPM(ctx); err != nil {
			return err
		}
		defer t.close()
		if kind == "swtpm" {
			d, err = h.tpmDevice(ctx, "bench-tpm", s, t)
		} else {
			d, err = h.tpmAttestationDevice(ctx, "bench-tpm-attestation", s, t)
		}
	} else {
		d, err = h.softwareDevice("bench-file", s)
	}
	if err != nil {
		return err
	}

	var hs [2]handshakeRecords // DPS, hub
	for i, p := range []*proxy.TCP{s.dps, s.hub} {
		if hs[i], err = h.handshakeCost(ctx, p, s.info.TrustBundle); err != nil {
			return fmt.Errorf("TLS handshake alone: %w", err)
		}
	}

	var first, prov []bootSample
	var last *agent
	for i := range h.opts.Runs {
		for _, dir := range []string{d.state, d.runtime} {
			if err := os.RemoveAll(dir); err != nil {
				return err
			}
		}
		a, b, err := h.boot(ctx, s, t, d, fmt.Sprintf("first-%d.log", i), true)
		if err != nil {
			return fmt.Errorf("first boot %d: %w", i+1, err)
		}
		if err := a.stop(); err != nil {
			return err
		}
		first = append(first, b)
		if a, b, err = h.boot(ctx, s, t, d, fmt.Sprintf("provisioned-%d.log", i), false); err != nil {
			return fmt.Errorf("provisioned boot %d: %w", i+1, err)
		}
		prov = append(prov, b)
		if i < h.opts.Runs-1 {
			if err := a.stop(); err != nil {
				return err
			}
		} else {
			last = a
		}
	}
	defer last.stop()
	h.reportBoots(kind, first, prov, t != nil, hs)
	if kind == "file" {
		if err := h.idle(ctx, last); err != nil {
			return fmt.Errorf("idle: %w", err)
		}
		if err := h.telemetry(ctx, d); err != nil {
			return fmt.Errorf("telemetry: %w", err)
		}
	}
	return nil
}

func (h *harness) reportBoots(kind string, first, prov []bootSample, tpm bool, hs [2]handshakeRecords) {
	r := h.report
	key := map[string]string{"file": "software key", "swtpm": "swtpm", "tpm-attestation": "TPM attestation"}[kind]
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	mb := func(n int64) float64 { return float64(n) / (1 << 20) }
	collect := func(bs []bootSample, f func(bootSample) float64) []float64 {
		out := make([]float64, len(bs))
		for i, b := range bs {
			out[i] = f(b)
		}
		return out
	}
	overheadTarget := map[string]float64{"file": 100}[kind]
	cmp := ""
	if overheadTarget > 0 {
		cmp = "<="
	}
	r.add("first boot: start → connected ("+key+")", "ms", collect(first, func(b bootSample) float64 { return ms(b.total) }), "", 0, "")
	r.add("first boot: start → registered ("+key+")", "ms", collect(first, func(b bootSample) float64 { return ms(b.registered) }), "", 0, "")
	r.add("first boot: agent overhead ("+key+")", "ms", collect(first, func(b bootSample) float64 { return ms(b.total - pollWait) }), cmp, overheadTarget,
		"total minus the 2 s the client must wait before its poll by protocol (retry-after 1 s, but DPS allows 5 polls per 10 s)")
	r.add("first boot: start → first log line ("+key+")", "ms", collect(first, func(b bootSample) float64 { return ms(b.firstLine) }), "", 0, "exec, Go runtime, configuration")
	r.add("first boot: DPS until the poll wait ("+key+")", "ms", collect(first, func(b bootSample) float64 { return ms(b.dpsSession) }), "", 0, "TCP, TLS, CONNECT, SUBSCRIBE, register")
	r.add("first boot: hub connect ("+key+")", "ms", collect(first, func(b bootSample) float64 { return ms(b.hubConnect) }), "", 0, "phase connecting → connected: TCP, TLS, CONNECT, subscriptions")
	r.add("provisioned boot: start → connected ("+key+")", "ms", collect(prov, func(b bootSample) float64 { return ms(b.total) }), "<=", 150, "")
	r.add("provisioned boot: DPS connections ("+key+")", "", collect(prov, func(b bootSample) float64 { return float64(b.dps.Connections) }), "==", 0, "counted by the proxy in front of DPS")
	rssTarget := map[string]float64{"file": 20}[kind]
	if rssTarget > 0 {
		r.add("peak RSS, first boot ("+key+")", "MB", collect(first, func(b bootSample) float64 { return mb(b.peakRSS) }), "<=", rssTarget, "VmHWM 0.5 s after connected")
	} else {
		r.add("peak RSS, first boot ("+key+")", "MB", collect(first, func(b bootSample) float64 { return mb(b.peakRSS) }), "", 0, "VmHWM 0.5 s after connected")
	}
	if tpm {
		if kind == "swtpm" {
			sign := func(b bootSample) float64 { return float64(b.tpm.ByCode[proxy.CCSign]) }
			r.add("TPM2_Sign per first boot", "", collect(first, sign), "==", 2, "")
			r.add("TPM2_Sign per provisioned boot", "", collect(prov, sign), "==", 1, "")
		}
		suffix := map[string]string{"tpm-attestation": " (TPM attestation)"}[kind]
		// The first of the runs is the only true first boot of a TPM attestation: it makes
		// the SRK, which the later runs find (only the state is removed between runs).
		r.add("TPM commands per first boot"+suffix, "", collect(first, func(b bootSample) float64 { return float64(b.tpm.Commands) }), "", 0, codes(first[0].tpm))
		r.add("TPM commands per provisioned boot"+suffix, "", collect(prov, func(b bootSample) float64 { return float64(b.tpm.Commands) }), "", 0, codes(prov[0].tpm))
		return
	}
	bytes := func(f func(bootSample) int64) func(bootSample) float64 {
		return func(b bootSample) float64 { return float64(f(b)) }
	}
	count := func(f func(bootSample) int) func(bootSample) float64 {
		return func(b bootSample) float64 { return float64(f(b)) }
	}
	for _, w := range []struct {
		name, unit string
		f          func(bootSample) float64
	}{
		{"TCP connections", "", count(func(b bootSample) int { return b.dps.Connections + b.hub.Connections })},
		{"DPS bytes sent", "B", bytes(func(b bootSample) int64 { return b.dps.Up.Bytes })},
		{"DPS bytes received", "B", bytes(func(b bootSample) int64 { return b.dps.Down.Bytes })},
		{"DPS MQTT packets sent", "", count(func(b bootSample) int { return b.dps.Up.AppRecords() - hs[0].up*b.dps.Connections })},
		{"DPS MQTT packets received", "", count(func(b bootSample) int { return b.dps.Down.AppRecords() - hs[0].down*b.dps.Connections })},
		{"hub bytes sent", "B", bytes(func(b bootSample) int64 { return b.hub.Up.Bytes })},
		{"hub bytes received", "B", bytes(func(b bootSample) int64 { return b.hub.Down.Bytes })},
		{"hub MQTT packets sent", "", count(func(b bootSample) int { return b.hub.Up.AppRecords() - hs[1].up*b.hub.Connections })},
		{"hub MQTT packets received", "", count(func(b bootSample) int { return b.hub.Down.AppRecords() - hs[1].down*b.hub.Connections })},
	} {
		r.add("wire, first boot: "+w.name, w.unit, collect(first, w.f), "", 0, "")
	}
	r.add("wire, provisioned boot: hub bytes sent+received", "B", collect(prov, bytes(func(b bootSample) int64 { return b.hub.Up.Bytes + b.hub.Down.Bytes })), "", 0, "")
	r.note("wire: TCP payload (TLS included) counted by proxies in front of DPS and the hub, until 0.5 s after connected. "+
		"MQTT travels inside TLS: MQTT packets are the TLS application-data records (crypto/tls sends a packet per record while it fits one) "+
		"less those of a handshake alone, measured through the same proxy (DPS, TLS 1.2: %d sent, %d received; hub, TLS 1.3, whose handshake is encrypted: %d sent, %d received)",
		hs[0].up, hs[0].down, hs[1].up, hs[1].down)
}

// tpmCommands names the TPM commands an agent is expected to send (TPM 2.0 Part 2, TPM_CC).
var tpmCommands = map[uint32]string{
	0x131: "CreatePrimary", 0x153: "Create", 0x157: "Load", 0x15D: "Sign", 0x161: "Unseal",
	0x165: "FlushContext", 0x169: "NV_ReadPublic", 0x14E: "NV_Read", 0x173: "ReadPublic",
	0x176: "StartAuthSession", 0x17A: "GetCapability", 0x17B: "GetRandom", 0x144: "Startup",
	0x120: "EvictControl", 0x147: "ActivateCredential", 0x151: "PolicySecret", 0x155: "HMAC", 0x156: "Import",
}

// codes lists TPM commands by name, for the notes.
func codes(c proxy.TPMCounts) string {
	keys := slices.Sorted(maps.Keys(c.ByCode))
	parts := make([]string, len(keys))
	for i, code := range keys {
		name, ok := tpmCommands[code]
		if !ok {
			name = fmt.Sprintf("0x%03X", code)
		}
		parts[i] = fmt.Sprintf("%s×%d", name, c.ByCode[code])
	}
	return strings.Join(parts, ", ")
}
