package reliability_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/internal/atomicfile"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/faultrun"
	"github.com/unicity-iot/unicity/internal/poll"
	"github.com/unicity-iot/unicity/localapi"
	"github.com/unicity-iot/unicity/storage"
)

// Where a SIGKILL left the renewal, as the state it left tells (TestRenewalSurvivesSIGKILL).
// A keyfile no state names besides is a new key not yet stored (in force only), or the
// replaced key not yet removed (committed).
const (
	killedInForce   = "in force only" // no renewal stored since the agent started
	killedOnTrial   = "on trial"      // a renewed certificate stored beside the one in force
	killedCommitted = "committed"     // a renewed certificate in force, stored by the killed agent
	unnamedKey      = " + a keyfile no state names"
)

// renewalValidity is the emulator's certificate lifetime in TestRenewalSurvivesSIGKILL: with
// renew_at 0.5 the agent renews every 2 s, so that random kills land in every step of a
// renewal, and a certificate outlives a kill, a restart and a renewal with room to spare on
// a loaded machine.
const renewalValidity = 4 * time.Second

// TestRenewalSurvivesSIGKILL SIGKILLs the real agent on swtpm at random moments while it
// renews its operational certificate every 2 s through the hub: starting, loading its
// credentials, connected, making the new key, asking the hub, storing the certificate on
// trial, reconnecting with it, committing it, destroying the old key. After every kill:
//   - the state loads (never missing, never corrupt) and names at most two keys (in force,
//     on trial), and at most one keyfile is named by no state (the one being made, or the one
//     being replaced);
//   - the agent restarts and connects to the hub with an operational certificate, never
//     stopping; it is then stopped cleanly once no renewal is under way, and leaves exactly
//     the keyfile its state names, no temporary keyfile, and no object or session in the TPM
//     (swtpm has no resource manager: what a stopped agent leaves stays);
//   - it registers with DPS again (with the onboarding identity, for a new certificate) only
//     when every certificate the state held had expired: a kill never costs a credential
//     that works, only the time the device was down can.
//
// The short form kills 20 times, the long form 200; the log counts the kills by the step the
// state shows.
func TestRenewalSurvivesSIGKILL(t *testing.T) {
	kills := faultrun.Rounds(20, 200)
	rng := faultrun.Rand(t, 14)
	e := startEmulator(t, "--poll-limit", "0")
	// The onboarding and operational keys in swtpm: three object slots, no resource manager.
	g, _, _ := swtpmGateway(t, e, "gw-renewal")
	sock := strings.TrimPrefix(g.tpmSpec(t), "swtpm:")
	out, err := exec.Command(e.bin, "policy", "--dir", e.dir, "--group", "factory", "--validity", renewalValidity.String()).CombinedOutput()
	require.NoError(t, err, "%s", out)
	b, err := os.ReadFile(g.config)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(g.config, append(b, "[certificates]\nissuance = \"dps\"\nrenew_at = 0.5\n"...), 0o600))
	cfg, err := config.Load(g.config)
	require.NoError(t, err)

	g.connectAndStop(t, sock) // the first boot: registered, issued
	steps := map[string]int{}
	var fellBack, leftInTPM int
	thumbprints := map[string]bool{}
	for i := range kills {
		before := g.loadState(t)
		registered := e.registrations(t, "gw-renewal")
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		agent, _, exited := g.runAgent(t, ctx)
		// Half the kills land anywhere in the first 2.5 s (start-up, the hub connection, one
		// renewal at least), half in the 50 ms from the renewal time, where the steps of a
		// renewal on swtpm and loopback are, a few milliseconds each.
		kill := time.Duration(rng.Int64N(int64(renewalValidity * 5 / 8)))
		if rng.IntN(2) == 0 {
			kill = time.Until(renewalTime(t, cfg.Certificates, before).Add(time.Duration(rng.Int64N(int64(50*time.Millisecond))) - 5*time.Millisecond))
		}
		time.Sleep(kill) // the random kill point is what this tests
		require.NoError(t, agent.Process.Signal(syscall.SIGKILL))
		<-exited
		cancel()
		killedAt := time.Now()

		left := g.loadState(t)
		named := operationalKeys(left)
		require.LessOrEqual(t, len(named), 2, "kill %d: the state names the key in force and at most one on trial", i)
		unnamed := g.unnamedKeyfiles(t, named)
		require.LessOrEqual(t, len(unnamed), 1, "kill %d: keyfiles no state names: %v", i, unnamed)
		step := killedInForce
		switch {
		case left.Renewal != nil:
			step = killedOnTrial
		case leaf(t, left.IssuedChain) != leaf(t, before.IssuedChain):
			step = killedCommitted
		}
		if len(unnamed) > 0 {
			step += unnamedKey
		}
		steps[step]++
		leftInTPM = max(leftInTPM, len(attesttest.LoadedInSWTPM(t, sock)))

		connectedAt := g.connectAndStop(t, sock)
		final := g.loadState(t)
		thumbprints[leaf(t, final.IssuedChain)] = true
		if e.registrations(t, "gw-renewal") > registered {
			fellBack++
			assert.True(t, expiredBy(t, before, killedAt) || expiredBy(t, left, connectedAt),
				"kill %d: the agent registered again while a certificate it held still worked: %+v", i, left)
		}
	}
	var seen []string
	for step, n := range steps {
		seen = append(seen, fmt.Sprintf("%s: %d", step, n))
	}
	slices.Sort(seen)
	t.Logf("%d SIGKILLs; the state they left: %s; at most %d objects left in the TPM by a kill; %d certificates in force after the restarts; %d registrations with the onboarding identity, after expiry",
		kills, strings.Join(seen, ", "), leftInTPM, len(thumbprints), fellBack)
	if faultrun.Long() {
		for _, step := range []string{killedInForce, killedOnTrial, killedCommitted} {
			assert.Positive(t, steps[step]+steps[step+unnamedKey], "kills landed at step %s", step)
		}
	}
}

// connectAndStop runs the agent until it is connected with an operational certificate and no
// renewal is under way, stops it with SIGINT, and checks what it left: exactly the keyfile its
// state names, no temporary keyfile, nothing in the TPM. It returns when the agent connected.
func (g *gateway) connectAndStop(t *testing.T, sock string) time.Time {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	agent, out, exited := g.runAgent(t, ctx)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)
	connectedAt := time.Now()
	cfg, err := config.Load(g.config)
	require.NoError(t, err)
	api := localapi.NewClient(cfg)
	// The live status, from the agent itself (the local API).
	var last *device.Status
	err = poll.Until(ctx, 20*time.Millisecond, func() bool {
		s, err := api.Status(ctx)
		if err != nil {
			return false
		}
		last = s
		return s.Phase == device.PhaseConnected && s.Credential == device.CredentialOperational &&
			s.Renewal != nil && s.Renewal.State == device.RenewalScheduled && s.Renewal.NextAt.After(time.Now())
	})
	require.NoError(t, err, "no settled renewal: status %+v\n%s", last, out)
	require.NoError(t, agent.Process.Signal(os.Interrupt))
	<-exited
	require.Contains(t, out.String(), "msg=stopped")
	require.NotContains(t, out.String(), "level=ERROR")

	st := g.loadState(t)
	assert.Nil(t, st.Renewal, "stopped with no renewal under way")
	assert.Empty(t, g.unnamedKeyfiles(t, operationalKeys(st)), "the keyfiles left are the state's")
	temps, err := filepath.Glob(atomicfile.TempGlob(filepath.Join(g.state, "operational-*.key")))
	require.NoError(t, err)
	assert.Empty(t, temps, "a killed writer's temporary keyfile is removed")
	assert.Zero(t, len(attesttest.LoadedInSWTPM(t, sock)), "a stopped agent leaves nothing in the TPM")
	return connectedAt
}

// loadState is the stored state, which must load.
func (g *gateway) loadState(t *testing.T) *storage.State {
	t.Helper()
	st, err := storage.New(g.state).Load()
	require.NoError(t, err)
	return st
}

// unnamedKeyfiles are the operational keyfiles in the state directory that named does not
// hold.
func (g *gateway) unnamedKeyfiles(t *testing.T, named []string) []string {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(g.state, "operational-*.key"))
	require.NoError(t, err)
	return slices.DeleteFunc(paths, func(p string) bool { return slices.Contains(named, "tpmkey:"+p) })
}

// operationalKeys are the keys st names: the one in force and the one on trial.
func operationalKeys(st *storage.State) []string {
	keys := []string{st.OperationalKey}
	if st.Renewal != nil {
		keys = append(keys, st.Renewal.OperationalKey)
	}
	return keys
}

// expiredBy reports whether every certificate st holds had expired at at.
func expiredBy(t *testing.T, st *storage.State, at time.Time) bool {
	t.Helper()
	chains := [][][]byte{st.IssuedChain}
	if st.Renewal != nil {
		chains = append(chains, st.Renewal.IssuedChain)
	}
	for _, chain := range chains {
		c, err := x509.ParseCertificate(chain[0])
		require.NoError(t, err)
		if at.Before(c.NotAfter) {
			return false
		}
	}
	return true
}

// renewalTime is when the agent renews the certificate in force in st.
func renewalTime(t *testing.T, cc config.Certificates, st *storage.State) time.Time {
	t.Helper()
	c, err := x509.ParseCertificate(st.IssuedChain[0])
	require.NoError(t, err)
	return device.RenewalTime(cc, c)
}

// leaf is the thumbprint of chain's first certificate.
func leaf(t *testing.T, chain [][]byte) string {
	t.Helper()
	require.NotEmpty(t, chain, "an operational certificate is stored")
	c, err := x509.ParseCertificate(chain[0])
	require.NoError(t, err)
	return certcodec.Thumbprint(c)
}
