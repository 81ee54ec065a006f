package reliability_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/config"
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

// TestTPMObjectSlotsExhausted: another program fills the TPM's transient object slots and
// exits without flushing them, as a crashed one would (swtpm has no resource manager, like
// /dev/tpm0, so they stay taken). No one can use them any more: the agent flushes them when
// it opens the TPM, loads its key and connects, without waiting on anyone.
func TestTPMObjectSlotsExhausted(t *testing.T) {
	e := startEmulator(t, "--poll-limit", "0")
	g, _, _ := swtpmGateway(t, e, "gw-slots")
	other, err := attest.OpenTPM(context.Background(), g.tpmSpec(t))
	require.NoError(t, err)
	held := 0
	for {
		_, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(keyfile.ECCSRK_H2_Template)}.Execute(other)
		if err != nil {
			require.ErrorIs(t, err, tpm2.TPMRCObjectMemory)
			break
		}
		held++
	}
	require.NoError(t, other.Close())
	t.Logf("another program left %d transient objects behind", held)

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	agent, out, exited := g.runAgent(t, ctx)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)
	agent.Process.Signal(os.Interrupt)
	<-exited
	assert.NotContains(t, out.String(), "out of memory")
}

// tpmSpec is the [tpm] device of the gateway's configuration.
func (g *gateway) tpmSpec(t *testing.T) string {
	t.Helper()
	cfg, err := config.Load(g.config)
	require.NoError(t, err)
	return cfg.TPM.Device
}

// TestKilledAgentsLeaveTheTPMUsable SIGKILLs the agent on swtpm (no resource manager, as on
// /dev/tpm0) at random moments: connected, holding its loaded key, or half-way through loading
// it (a storage root key, a session). Each leaves its objects in the TPM; the next agent
// flushes them and connects. The short form kills 5 times, the long form 20.
func TestKilledAgentsLeaveTheTPMUsable(t *testing.T) {
	kills := 5
	if long() {
		kills = 20
	}
	e := startEmulator(t, "--poll-limit", "0")
	g, _, _ := swtpmGateway(t, e, "gw-killed")
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 2))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Second)
	defer cancel()
	sock := strings.TrimPrefix(g.tpmSpec(t), "swtpm:")
	var left []int
	for i := range kills {
		agent, _, exited := g.runAgent(t, ctx)
		if i%3 == 0 {
			g.awaitPhase(t, agent, exited, device.PhaseConnected, 60*time.Second) // holding its key for sure
		} else {
			time.Sleep(time.Duration(rng.IntN(80)) * time.Millisecond) // starting, loading its key, registering
		}
		require.NoError(t, agent.Process.Kill())
		<-exited
		left = append(left, len(attesttest.LoadedInSWTPM(t, sock)))
	}
	t.Logf("objects and sessions in the TPM after each kill: %v", left)
	assert.GreaterOrEqual(t, slices.Max(left), 1, "the kills left objects behind")
	agent, _, exited := g.runAgent(t, ctx)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 60*time.Second)
	agent.Process.Signal(os.Interrupt)
	<-exited
	assert.Zero(t, len(attesttest.LoadedInSWTPM(t, sock)), "a stopped agent leaves nothing")
}

// silentGateway is a device whose key and certificate were made on swtpm, configured with a
// TPM that never answers.
func silentGateway(t *testing.T) (*gateway, *attesttest.WedgeProxy) {
	e := startEmulator(t, "--poll-limit", "0")
	g, _, _ := swtpmGateway(t, e, "gw-silent")
	cfg, err := os.ReadFile(g.config)
	require.NoError(t, err)
	silent := attesttest.SilentTPM(t)
	cfg = []byte(strings.Replace(string(cfg), g.tpmSpec(t), silent.Spec(), 1))
	require.NoError(t, os.WriteFile(g.config, cfg, 0o600))
	return g, silent
}

// waitOnTPM returns once a program has sent silent a command it waits on.
func waitOnTPM(t *testing.T, silent *attesttest.WedgeProxy, before int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	require.NoError(t, poll.Until(ctx, 10*time.Millisecond, func() bool { return silent.Swallowed.Load() > before }))
}

// TestSilentTPMCommands: check, identity and factory verify on a TPM that never answers
// exit 75 within the TPM command deadline, naming the TPM, rather than hang; a signal ends
// them at once.
func TestSilentTPMCommands(t *testing.T) {
	g, silent := silentGateway(t)
	spec := silent.Spec()
	for _, args := range [][]string{{"check"}, {"identity"}, {"factory", "verify"}} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd, out := g.command(ctx, args...)
			start := time.Now()
			err := cmd.Run()
			took := time.Since(start)
			t.Logf("%s in %s:\n%s", args, took.Round(time.Millisecond), out)
			require.Error(t, err)
			assert.Equal(t, 75, cmd.ProcessState.ExitCode())
			assert.Less(t, took, 3*attest.CommandTimeout)
			assert.Contains(t, out.String(), spec+" did not answer within "+attest.CommandTimeout.String())

			cmd, _ = g.command(ctx, args...)
			before := silent.Swallowed.Load()
			require.NoError(t, cmd.Start())
			waitOnTPM(t, silent, before)
			start = time.Now()
			require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
			cmd.Wait()
			assert.Less(t, time.Since(start), time.Second, "SIGTERM ends the wait on the TPM")
			assert.Equal(t, 75, cmd.ProcessState.ExitCode())
		})
	}
}

// notifySocket is systemd's notification socket as the agent sees it under the unit (Type=
// notify, WatchdogSec=), recording WATCHDOG=1 pings.
type notifySocket struct {
	path  string
	pings atomic.Int64
}

func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	dir, err := os.MkdirTemp("", "notify")
	require.NoError(t, err)
	n := &notifySocket{path: filepath.Join(dir, "notify.sock")}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	require.NoError(t, err)
	done := make(chan struct{})
	t.Cleanup(func() {
		conn.Close()
		<-done
		os.RemoveAll(dir)
	})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			if strings.Contains(string(buf[:k]), "WATCHDOG=1") {
				n.pings.Add(1)
			}
		}
	}()
	return n
}

// TestSilentTPMAgent: the agent on a TPM that never answers shows waiting_for_tpm with the
// reason, keeps feeding systemd's watchdog (its waits are bounded), and stops within its 5 s
// budget on SIGTERM, while a TPM command is in flight as well as between attempts.
func TestSilentTPMAgent(t *testing.T) {
	g, silent := silentGateway(t)
	spec := silent.Spec()
	notify := listenNotify(t)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	start := func() (*exec.Cmd, <-chan struct{}) {
		cmd, _ := g.command(ctx, "run")
		cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify.path, "WATCHDOG_USEC=2000000")
		os.Remove(filepath.Join(g.run, device.StatusFileName))
		require.NoError(t, cmd.Start())
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		t.Cleanup(func() { cmd.Process.Kill(); <-exited })
		return cmd, exited
	}
	stopsWithin := func(cmd *exec.Cmd, exited <-chan struct{}, budget time.Duration) {
		t.Helper()
		at := time.Now()
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		select {
		case <-exited:
			t.Logf("stopped %s after SIGTERM", time.Since(at).Round(time.Millisecond))
		case <-time.After(budget):
			t.Fatalf("still running %s after SIGTERM", budget)
		}
	}

	agent, exited := start()
	g.awaitPhase(t, agent, exited, device.PhaseWaitingTPM, 3*attest.CommandTimeout)
	s, err := device.ReadStatus(g.run)
	require.NoError(t, err)
	t.Logf("status: %s: %s", s.Phase, s.Message)
	assert.Contains(t, s.Message, "waiting for the TPM: ")
	assert.Contains(t, s.Message, spec+" did not answer within")
	pings := notify.pings.Load()
	assert.Positive(t, pings, "pings went on while the first command waited out its deadline")
	require.Eventually(t, func() bool { return notify.pings.Load() >= pings+2 }, 10*time.Second, 50*time.Millisecond,
		"pings go on while the agent waits for the TPM")
	stopsWithin(agent, exited, 5*time.Second)

	before := silent.Swallowed.Load()
	agent, exited = start()
	waitOnTPM(t, silent, before) // inside the first command's wait
	stopsWithin(agent, exited, 5*time.Second)
}

// TestCheckWhileTheAgentHoldsSWTPM: swtpm serves one program at a time, and the running
// agent holds it. `unicity check` says so within seconds, naming the agent and its pid, and
// still runs the checks that need no TPM.
func TestCheckWhileTheAgentHoldsSWTPM(t *testing.T) {
	e := startEmulator(t, "--poll-limit", "0")
	g, _, _ := swtpmGateway(t, e, "gw-held")
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	agent, _, exited := g.runAgent(t, ctx)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)

	cmd, out := g.command(ctx, "check")
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	t.Logf("check in %s:\n%s", took.Round(time.Millisecond), out)
	require.Error(t, err)
	assert.Equal(t, 75, cmd.ProcessState.ExitCode())
	assert.Less(t, took, 2*attest.CommandTimeout)
	assert.Regexp(t, fmt.Sprintf(`(?m)^fail  tpm .*held by another process: the agent \(pid %d, connected\)`, agent.Process.Pid), out.String())
	for _, line := range []string{`(?m)^pass  config `, `(?m)^pass  clock `, `(?m)^pass  dps tls `, `(?m)^pass  hub tls `} {
		assert.Regexp(t, line, out.String())
	}
	agent.Process.Signal(os.Interrupt)
	<-exited
}
