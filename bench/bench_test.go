package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest/attesttest"
)

// TestShortBench runs the CI variant of `make bench` against freshly built binaries, so that
// the harness cannot rot. It checks what the figures must say whatever the machine (every
// figure measured, no DPS connection on a provisioned boot, two TPM signatures then one, two
// per renewal, no device left unprovisioned), not speed or memory: those are the benchmark's to report.
func TestShortBench(t *testing.T) {
	if testing.Short() {
		t.Skip("the short benchmark takes about 90 s")
	}
	opts := ShortOptions()
	opts.TPM = true
	if _, err := exec.LookPath("swtpm"); err != nil {
		if attesttest.Strict() {
			t.Fatalf("swtpm is required (UNICITY_TEST_STRICT=1): %v", err)
		}
		opts.TPM = false
	}
	opts.Bin = t.TempDir()
	opts.Dist = t.TempDir() // empty: the size of the built agent
	for _, pkg := range []string{"unicity", "unicity-emulator"} {
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(opts.Bin, pkg), "../cmd/"+pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s", out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, err := Run(ctx, opts)
	require.NoError(t, err)
	require.Empty(t, r.Failures)

	keys := []string{"software key"}
	if opts.TPM {
		keys = append(keys, "swtpm")
		for name, want := range map[string]float64{"TPM2_Sign per first boot": 2, "TPM2_Sign per provisioned boot": 1, "TPM2_Sign per renewal": 2} {
			f := r.Figure(name)
			if assert.NotNil(t, f, name) {
				assert.Equal(t, []float64{want, want}, f.Samples, name)
			}
		}
		for _, name := range []string{"renewal: renewal time → committed", "renewal: renewal time → reconnecting", "TPM commands per renewal"} {
			f := r.Figure(name)
			if assert.NotNil(t, f, name) {
				assert.Len(t, f.Samples, opts.Runs, name)
				assert.Positive(t, f.Min, name)
			}
		}
	}
	for _, k := range keys {
		f := r.Figure("provisioned boot: DPS connections (" + k + ")")
		if assert.NotNil(t, f, k) {
			assert.Equal(t, []float64{0, 0}, f.Samples, k)
		}
		for _, name := range []string{"first boot: start → connected", "first boot: agent overhead", "provisioned boot: start → connected", "peak RSS, first boot"} {
			f := r.Figure(name + " (" + k + ")")
			if assert.NotNil(t, f, name) {
				assert.Len(t, f.Samples, opts.Runs, name)
				assert.Positive(t, f.Min, name)
			}
		}
	}
	for _, name := range []string{"peak RSS, connected idle", "telemetry: PUBACK latency p99", "telemetry, durable: messages/s, one at a time", "binary size (this machine)",
		"wire, first boot: DPS bytes sent", "wire, first boot: hub bytes received", "fleet storm: time until all assigned"} {
		f := r.Figure(name)
		if assert.NotNil(t, f, name) {
			assert.Positive(t, f.Median, name)
		}
	}
	if f := r.Figure("fleet storm: devices unprovisioned"); assert.NotNil(t, f) {
		assert.Equal(t, []float64{0}, f.Samples)
	}
	if f := r.Figure("fleet storm: 429 responses"); assert.NotNil(t, f) {
		assert.GreaterOrEqual(t, f.Median, float64(opts.Fleet-opts.Quota), "the quota must throttle the storm")
	}

	var table bytes.Buffer
	require.NoError(t, r.WriteTable(&table))
	path := filepath.Join(t.TempDir(), "bench.json")
	require.NoError(t, r.WriteJSON(path))
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	var back Report
	require.NoError(t, json.Unmarshal(data, &back))
	assert.Len(t, back.Figures, len(r.Figures))
	for _, f := range r.Figures {
		assert.Contains(t, table.String(), f.Name)
	}
	t.Logf("\n%s", table.String())
}
