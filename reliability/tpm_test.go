package reliability_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/internal/poll"
)

// swtpmGateway starts swtpm and makes a device whose key lives in it, through the real
// factory commands. It returns the gateway and a function that restarts swtpm on the same
// state (a TPM reset: transient objects are gone, the seeds and NV stay).
func swtpmGateway(t *testing.T, e *emulator, regID string) (*gateway, func(), func()) {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		if strict() {
			t.Fatal("swtpm is not installed")
		}
		t.Skip("swtpm is not installed")
	}
	dir, err := os.MkdirTemp("", "swtpm") // a socket path must stay under 108 bytes
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	p, err := attesttest.Start(bin, dir)
	require.NoError(t, err)
	t.Cleanup(func() { p.Stop() })
	tpm := "swtpm:" + p.Addr

	g := newGateway(t, e)
	key, csr, cert, ident := filepath.Join(g.dir, "identity.key"), filepath.Join(g.dir, "identity.csr"), filepath.Join(g.dir, "cert.pem"), filepath.Join(g.dir, "identity.pem")
	for _, args := range [][]string{
		{g.bin, "factory", "keygen", "--tpm", tpm, "--out", key},
		{g.bin, "factory", "csr", "--tpm", tpm, "--key", key, "--cn", regID, "--out", csr},
		{e.bin, "sign", "--dir", e.dir, "--csr", csr, "--out", cert},
		{g.bin, "factory", "install", "--tpm", tpm, "--key", key, "--cert", cert, "--out", ident},
	} {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		require.NoError(t, err, "%v: %s", args, out)
	}
	g.writeConfig(t, e, "[attestation]\nidentity_cert = \""+ident+"\"\nidentity_key = \"tpmkey:"+key+"\"\n[tpm]\ndevice = \""+tpm+"\"\n")
	stop := func() { p.Stop() }
	start := func() {
		p, err = attesttest.Start(bin, dir)
		require.NoError(t, err)
	}
	return g, stop, start
}

// TestTPMRestartWhileRunning kills swtpm under the connected agent and makes it reconnect
// (the emulator restarts, so the TLS handshake needs a signature): the status says the TPM
// is the problem. swtpm then comes back on the same state, and the agent must connect again
// without being restarted.
func TestTPMRestartWhileRunning(t *testing.T) {
	e := startEmulator(t, "--poll-limit", "0")
	g, stopTPM, startTPM := swtpmGateway(t, e, "gw-tpm")
	g.policy(t, `reprovision_interval = "1s"`)
	ctx, cancel := context.WithTimeout(context.Background(), 180*time.Second)
	defer cancel()
	agent, _, exited := g.runAgent(t, ctx)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)

	stopTPM()
	e.restart()
	var last *device.Status
	noticed, cancelNoticed := context.WithTimeout(ctx, 20*time.Second)
	defer cancelNoticed()
	_ = poll.Until(noticed, 50*time.Millisecond, func() bool {
		if s, err := device.ReadStatus(g.run); err == nil && s.Phase != device.PhaseConnected && s.LastError != "" {
			last = s
		}
		return last != nil && strings.Contains(strings.ToLower(last.LastError), "tpm")
	})
	require.NotNil(t, last, "the agent noticed")
	t.Logf("status without the TPM: %s: %s (last error: %s)", last.Phase, last.Message, last.LastError)
	assert.Contains(t, strings.ToLower(last.LastError), "tpm", "the status names the TPM")

	startTPM()
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 60*time.Second)
	agent.Process.Signal(os.Interrupt)
	<-exited
}

// TestTPMObjectSlotsExhausted: another program fills the TPM's transient object slots (swtpm
// has no resource manager, like /dev/tpm0): the agent starting then says the TPM is out of
// memory and waits; once the slots are freed it loads its key and connects, unrestarted.
func TestTPMObjectSlotsExhausted(t *testing.T) {
	e := startEmulator(t, "--poll-limit", "0")
	g, _, _ := swtpmGateway(t, e, "gw-slots")
	cfg, err := os.ReadFile(g.config)
	require.NoError(t, err)
	spec := strings.Split(strings.SplitAfter(string(cfg), "device = \"")[1], "\"")[0]
	// swtpm serves one connection at a time: the other program fills the slots and exits
	// without flushing, as a crashed one would; without a resource manager they stay taken.
	other, err := attest.OpenTPM(context.Background(), spec)
	require.NoError(t, err)
	var held []tpm2.TPMHandle
	for {
		srk, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(keyfile.ECCSRK_H2_Template)}.Execute(other)
		if err != nil {
			require.ErrorIs(t, err, tpm2.TPMRCObjectMemory)
			break
		}
		held = append(held, srk.ObjectHandle)
	}
	require.NoError(t, other.Close())
	t.Logf("another program left %d transient objects behind", len(held))

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	agent, _, exited := g.runAgent(t, ctx)
	var last *device.Status
	deadline := time.Now().Add(20 * time.Second)
	noticed, cancelNoticed := context.WithDeadline(ctx, deadline)
	defer cancelNoticed()
	_ = poll.Until(noticed, 50*time.Millisecond, func() bool {
		if s, err := device.ReadStatus(g.run); err == nil && strings.Contains(s.LastError, "out of memory") {
			last = s
		}
		return last != nil
	})
	if last == nil {
		s, _ := device.ReadStatus(g.run)
		t.Fatalf("the status does not say the TPM is out of memory: %+v", s)
	}
	assert.Equal(t, device.PhaseLoading, last.Phase)
	t.Logf("status: %s: %s (last error: %s)", last.Phase, last.Message, last.LastError)

	// An operator frees them (tpm2_flushcontext -t), between two of the agent's attempts.
	freed := 0
	for freed < len(held) && time.Now().Before(deadline.Add(30*time.Second)) {
		other, err := attest.OpenTPM(context.Background(), spec)
		require.NoError(t, err)
		for _, h := range held[freed:] {
			if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(other); err != nil {
				break
			}
			freed++
		}
		other.Close()
	}
	require.Equal(t, len(held), freed)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 60*time.Second)
	agent.Process.Signal(os.Interrupt)
	<-exited
}
