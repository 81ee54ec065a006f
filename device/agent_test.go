package device_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/device/devicetest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/storage"
)

func TestFirstBootProvisionsAndConnects(t *testing.T) {
	tb := devicetest.New(t)
	tb.Start()
	s := tb.WaitPhase(device.PhaseConnected)
	assert.Equal(t, "hub-a.example", s.AssignedHub)
	assert.Equal(t, "gw-0001", s.RegistrationID)
	assert.Equal(t, 1, tb.DPS.Calls())
	assert.Equal(t, 1, tb.Notify.Count("READY=1"))

	st := tb.LoadState()
	assert.True(t, st.BelongsTo("gw-0001", certcodec.Thumbprint(tb.Leaf.Certificate())))
	assert.Equal(t, "hub-a.example", st.AssignedHub)
	assert.Equal(t, 1, st.Attempts)

	require.Eventually(t, func() bool {
		onDisk, err := device.ReadStatus(tb.Config.Runtime.Dir)
		return err == nil && onDisk.Phase == device.PhaseConnected
	}, 5*time.Second, time.Millisecond, "status file")

	require.NoError(t, tb.Stop())
	assert.Equal(t, 1, tb.Notify.Count("STOPPING=1"))
	assert.True(t, tb.Hub.Last().Closed.Load(), "the session is closed on stop")
	onDisk, err := device.ReadStatus(tb.Config.Runtime.Dir)
	require.NoError(t, err)
	assert.Equal(t, device.PhaseStopped, onDisk.Phase)
}

func TestSecondBootUsesStoredAssignment(t *testing.T) {
	tb := devicetest.New(t)
	tb.SaveState(&storage.State{
		RegistrationID: "GW-0001", Binding: certcodec.Thumbprint(tb.Leaf.Certificate()),
		AssignedHub: "hub-b.example", DeviceID: "gw-0001", ProvisionedAt: tb.Clock.Now().Add(-time.Hour),
	})
	tb.Start()
	s := tb.WaitPhase(device.PhaseConnected)
	assert.Equal(t, "hub-b.example", s.AssignedHub)
	assert.Zero(t, tb.DPS.Calls(), "no DPS traffic when the state is valid")
}

func TestStateNotUsableRegistersAgain(t *testing.T) {
	tests := []struct {
		name  string
		setup func(tb *devicetest.Testbed)
		note  string
	}{
		{"another certificate", func(tb *devicetest.Testbed) {
			tb.SaveState(&storage.State{RegistrationID: "gw-0001", Binding: strings.Repeat("AB", 32), AssignedHub: "hub-old", DeviceID: "gw-0001"})
		}, "another identity"},
		{"another device (cloned image)", func(tb *devicetest.Testbed) {
			tb.SaveState(&storage.State{RegistrationID: "gw-0002", Binding: certcodec.Thumbprint(tb.Leaf.Certificate()), AssignedHub: "hub-old", DeviceID: "gw-0002"})
		}, "another identity"},
		{"corrupt", func(tb *devicetest.Testbed) {
			require.NoError(t, os.MkdirAll(tb.Config.State.Dir, 0o700))
			require.NoError(t, os.WriteFile(filepath.Join(tb.Config.State.Dir, storage.FileName), []byte("{garbage"), 0o600))
		}, "corrupt"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tb := devicetest.New(t)
			tt.setup(tb)
			tb.Start()
			s := tb.WaitPhase(device.PhaseConnected)
			assert.Equal(t, "hub-a.example", s.AssignedHub)
			assert.Equal(t, 1, tb.DPS.Calls())
			assert.Contains(t, s.LastError, tt.note)
			assert.Equal(t, "hub-a.example", tb.LoadState().AssignedHub)
		})
	}
}

func TestProvisioningRetriesWithBackoffAndRetryAfter(t *testing.T) {
	unreachable := device.Mark(errors.New("dial tcp: connection refused"), device.ErrUnreachable)
	throttled := &device.RetryAfterError{After: 40 * time.Second, Err: device.Mark(errors.New("throttled by DPS"), device.ErrTemporary)}
	tb := devicetest.New(t, devicetest.Failing(unreachable), devicetest.Failing(throttled), devicetest.Assigned("hub-a.example"))
	tb.Start()

	s := tb.WaitRetry(device.PhaseProvisioning)
	assert.Equal(t, 1, tb.DPS.Calls())
	assert.Equal(t, time.Second, s.NextRetry.Sub(s.LastErrorAt), "first backoff")
	assert.Contains(t, s.LastError, "connection refused")
	assert.Contains(t, s.Message, "retrying in")
	tb.Clock.Advance(time.Second)

	s = tb.WaitRetry(device.PhaseProvisioning)
	assert.Equal(t, 2, tb.DPS.Calls())
	assert.Equal(t, 40*time.Second, s.NextRetry.Sub(s.LastErrorAt), "retry-after wins over a shorter backoff")
	tb.Clock.Advance(39 * time.Second)
	assert.Never(t, func() bool { return tb.DPS.Calls() > 2 }, 50*time.Millisecond, time.Millisecond, "retried before retry-after")
	tb.Clock.Advance(time.Second)

	tb.WaitPhase(device.PhaseConnected)
	assert.Equal(t, 3, tb.DPS.Calls())
	assert.Equal(t, 3, tb.LoadState().Attempts)
}

func TestRefusalParksWithoutHammering(t *testing.T) {
	refused := device.Mark(errors.New("enrollment disabled"), device.ErrRefused)
	tb := devicetest.New(t, devicetest.Failing(refused), devicetest.Assigned("hub-a.example"))
	tb.Start()

	s := tb.WaitRetry(device.PhaseParked)
	assert.Equal(t, time.Hour, s.NextRetry.Sub(tb.Clock.Now()))
	assert.Contains(t, s.Message, "enrollment disabled")
	assert.Equal(t, 1, tb.Notify.Count("READY=1"), "parked is ready, with the reason in STATUS=")
	tb.Clock.Advance(59 * time.Minute)
	assert.Never(t, func() bool { return tb.DPS.Calls() > 1 }, 50*time.Millisecond, time.Millisecond)

	tb.Clock.Advance(time.Minute)
	tb.WaitPhase(device.PhaseConnected)
	assert.Equal(t, 2, tb.DPS.Calls())
	assert.Equal(t, 1, tb.Notify.Count("READY=1"), "READY=1 is sent once")
}

func TestWaitsForValidClock(t *testing.T) {
	tb := devicetest.New(t)
	real := tb.Clock.Now()
	tb.Clock.Set(time.Unix(0, 0))
	tb.Start()
	s := tb.WaitPhase(device.PhaseWaitingClock)
	assert.Contains(t, s.Message, "1970-01-01")
	assert.Zero(t, tb.DPS.Calls())
	require.Eventually(t, func() bool { return tb.Clock.HasTimerAt(time.Unix(0, 0).Add(device.ClockPoll)) }, 5*time.Second, time.Millisecond)
	tb.Clock.Set(real)
	tb.WaitPhase(device.PhaseConnected)
	assert.Equal(t, 1, tb.DPS.Calls())
}

func TestFirstBootDelaySpreadsRegistrations(t *testing.T) {
	tb := devicetest.New(t)
	tb.Config.Agent.FirstBootDelay = 10 * time.Minute
	tb.Start()
	s := tb.WaitRetry(device.PhaseProvisioning)
	assert.Contains(t, s.Message, "first boot")
	assert.LessOrEqual(t, s.NextRetry.Sub(tb.Clock.Now()), 10*time.Minute)
	tb.Clock.Advance(10 * time.Minute)
	tb.WaitPhase(device.PhaseConnected)
	assert.Equal(t, 1, tb.DPS.Calls())
}

func TestHubRefusingIdentityReprovisionsRateLimited(t *testing.T) {
	tb := devicetest.New(t, devicetest.Assigned("hub-b.example"))
	provisioned := tb.Clock.Now().Add(-time.Minute)
	tb.SaveState(&storage.State{
		RegistrationID: "gw-0001", Binding: certcodec.Thumbprint(tb.Leaf.Certificate()),
		AssignedHub: "hub-a.example", DeviceID: "gw-0001", ProvisionedAt: provisioned,
	})
	tb.Hub.SetRefusal("hub-a.example", device.Mark(errors.New("CONNACK 5"), device.ErrIdentityRejected))
	tb.Start()

	s := tb.WaitRetry(device.PhaseProvisioning)
	assert.Equal(t, provisioned.Add(tb.Config.Agent.ReprovisionInterval), s.NextRetry, "rate limit since the last registration")
	assert.Contains(t, s.Message, "refused the identity")
	assert.Zero(t, tb.DPS.Calls())
	assert.Equal(t, "hub-a.example", tb.LoadState().AssignedHub, "the old assignment stays until a new one is stored")

	tb.Clock.Set(s.NextRetry)
	s = tb.WaitPhase(device.PhaseConnected)
	assert.Equal(t, "hub-b.example", s.AssignedHub)
	assert.Equal(t, 1, tb.DPS.Calls())
	assert.Equal(t, "hub-b.example", tb.LoadState().AssignedHub)
}

func TestUnreachableHubSendsBackToDPS(t *testing.T) {
	tb := devicetest.New(t, devicetest.Assigned("hub-a.example"), devicetest.Assigned("hub-b.example"))
	tb.Config.Agent.HubFailures = 3
	tb.Config.Agent.ReprovisionInterval = 0
	tb.Hub.SetRefusal("hub-a.example", device.Mark(errors.New("connection refused"), device.ErrUnreachable))
	tb.Start()

	for range 2 {
		tb.WaitRetry(device.PhaseConnecting)
		tb.Clock.Advance(time.Minute)
	}
	s := tb.WaitPhase(device.PhaseConnected)
	assert.Equal(t, "hub-b.example", s.AssignedHub)
	assert.Equal(t, 2, tb.DPS.Calls())
	assert.Equal(t, []string{"hub-a.example", "hub-a.example", "hub-a.example", "hub-b.example"}, tb.Hub.Attempts())
}

func TestLostSessionReconnects(t *testing.T) {
	tb := devicetest.New(t)
	tb.Start()
	tb.WaitPhase(device.PhaseConnected)
	first := tb.Hub.Last()
	first.End(device.Mark(errors.New("connection reset"), device.ErrUnreachable))
	tb.WaitRetry(device.PhaseConnecting)
	tb.Clock.Advance(time.Second)
	tb.WaitPhase(device.PhaseConnected)
	assert.NotSame(t, first, tb.Hub.Last())
	assert.Equal(t, 1, tb.DPS.Calls())
}

func TestIdentityErrorsStopTheAgent(t *testing.T) {
	tb := devicetest.New(t)
	tb.Agent.Credentials = func(context.Context, *config.Config) (*device.Credentials, error) {
		return nil, device.ClassifyIdentityError(fmt.Errorf("%w: certificate for another key", attest.ErrKeyMismatch))
	}
	tb.Start()
	err, ok := tb.Returned()
	require.True(t, ok, "the agent kept running with an unusable identity")
	require.ErrorIs(t, err, device.ErrIdentity)
}

func TestTPMNotReadyIsRetried(t *testing.T) {
	tb := devicetest.New(t)
	calls := 0
	tb.Agent.Credentials = func(ctx context.Context, cfg *config.Config) (*device.Credentials, error) {
		calls++
		if calls == 1 {
			return nil, device.ClassifyIdentityError(fmt.Errorf("%w at swtpm:127.0.0.1:1: connection refused", attest.ErrNoTPM))
		}
		return device.OpenCredentials(ctx, cfg)
	}
	tb.Start()
	s := tb.WaitRetry(device.PhaseWaitingTPM)
	assert.Contains(t, s.Message, "waiting for the TPM: ")
	tb.Clock.Advance(time.Second)
	tb.WaitPhase(device.PhaseConnected)
}

// TestTPMThatDoesNotAnswerYet: while loading the identity waits on the TPM (each command
// within its deadline), the status says so, the watchdog keeps being fed, and a stop cuts
// the wait short.
func TestTPMThatDoesNotAnswerYet(t *testing.T) {
	tb := devicetest.New(t)
	tb.Agent.Watchdog = 20 * time.Millisecond
	tb.Agent.Credentials = func(ctx context.Context, _ *config.Config) (*device.Credentials, error) {
		<-ctx.Done() // a wedged TPM under attest's deadline-less fake
		return nil, fmt.Errorf("%w: command interrupted: %w", attest.ErrTPMUnavailable, ctx.Err())
	}
	tb.Start()
	s := tb.WaitPhase(device.PhaseLoading)
	assert.Equal(t, "loading the device identity", s.Message)
	pings := tb.Notify.Count("WATCHDOG=1")
	require.Eventually(t, func() bool { return tb.Notify.Count("WATCHDOG=1") >= pings+3 }, 5*time.Second, time.Millisecond,
		"a bounded wait on the TPM does not get the agent killed by the watchdog")
	require.NoError(t, tb.Stop(), "stopped within 5 s, by the end of its context")
}

// TestTPMThatDoesNotExistYet: the TPM's socket (a device node, when its driver loads late)
// is not there when the agent starts. It waits in waiting_for_tpm, looking again every
// device.TPMDevicePoll, and loads the identity once the TPM appears: not an exit 78 that systemd
// would never restart.
func TestTPMThatDoesNotExistYet(t *testing.T) {
	p := attesttest.SWTPMProcess(t)
	spec := "swtpm:" + p.Addr
	tpm, err := attest.OpenTPM(context.Background(), spec)
	require.NoError(t, err)
	kf, err := attest.CreateKey(tpm, attest.ECDSAP256)
	require.NoError(t, err)
	require.NoError(t, tpm.Close())
	keyPath := filepath.Join(t.TempDir(), "identity.key")
	require.NoError(t, attest.WriteKeyfile(keyPath, kf))
	pub, err := kf.PublicKey()
	require.NoError(t, err)
	ca, err := pki.NewRoot("Test Root")
	require.NoError(t, err)
	leaf, err := ca.IssueDevice("gw-0001", pub)
	require.NoError(t, err)
	certPath := filepath.Join(t.TempDir(), "identity.pem")
	require.NoError(t, certcodec.WriteCertificates(certPath, leaf.Chain...))
	p.Stop()
	require.NoError(t, os.Remove(p.Addr))

	tb := devicetest.New(t)
	tb.Config.Attestation.IdentityKey, tb.Config.Attestation.IdentityCert, tb.Config.TPM.Device = "tpmkey:"+keyPath, certPath, spec
	tb.Start()
	s := tb.WaitRetry(device.PhaseWaitingTPM)
	assert.Contains(t, s.Message, "waiting for the TPM to appear: no TPM at "+spec)
	assert.Equal(t, device.TPMDevicePoll, s.NextRetry.Sub(tb.Clock.Now()), "a slow, steady look")
	tb.Clock.Advance(device.TPMDevicePoll)
	tb.WaitRetry(device.PhaseWaitingTPM)

	require.NoError(t, p.Restart())
	tb.Clock.Advance(device.TPMDevicePoll)
	tb.WaitPhase(device.PhaseConnected)
}

func TestWatchdogPingsWhileLoopIsAlive(t *testing.T) {
	tb := devicetest.New(t)
	tb.Agent.Watchdog = 20 * time.Millisecond
	real := tb.Clock.Now()
	tb.Clock.Set(time.Unix(0, 0))
	tb.Start()

	tb.WaitPhase(device.PhaseWaitingClock)
	require.Eventually(t, func() bool { return tb.Notify.Count("EXTEND_TIMEOUT_USEC=20000") >= 2 }, 5*time.Second, time.Millisecond,
		"a healthy agent that is not ready yet extends the start timeout")
	require.Eventually(t, func() bool { return tb.Clock.HasTimerAt(time.Unix(0, 0).Add(device.ClockPoll)) }, 5*time.Second, time.Millisecond)
	tb.Clock.Set(real)

	tb.WaitPhase(device.PhaseConnected)
	extended := tb.Notify.Count("EXTEND_TIMEOUT_USEC=20000")
	pings := tb.Notify.Count("WATCHDOG=1")
	require.Eventually(t, func() bool { return tb.Notify.Count("WATCHDOG=1") >= pings+3 }, 5*time.Second, time.Millisecond)
	assert.LessOrEqual(t, tb.Notify.Count("EXTEND_TIMEOUT_USEC=20000"), extended+1, "no extension once ready")
}

func TestStaleSessionGoesBackToDPS(t *testing.T) {
	tb := devicetest.New(t, devicetest.Assigned("hub-a.example"), devicetest.Assigned("hub-b.example"))
	tb.Config.Agent.ReprovisionInterval = 0
	tb.Start()
	tb.WaitPhase(device.PhaseConnected)
	first := tb.Hub.Last()
	first.End(device.Mark(errors.New("hub unreachable, giving up after 10 attempts"), device.ErrStale))
	require.Eventually(t, func() bool {
		s := tb.Agent.Status()
		return tb.Hub.Last() != first && s.Phase == device.PhaseConnected && s.AssignedHub == "hub-b.example"
	}, 5*time.Second, time.Millisecond)
	assert.Equal(t, 2, tb.DPS.Calls(), "a session that gave up counts as hub_failures failures: straight back to DPS")
	assert.Equal(t, []string{"hub-a.example", "hub-b.example"}, tb.Hub.Attempts(), "no retry of the stale hub first")
}

func TestWatchdogStopsWhenTheLoopIsStuck(t *testing.T) {
	tb := devicetest.New(t)
	tb.Agent.Watchdog = 20 * time.Millisecond
	release := make(chan struct{})
	var once sync.Once
	tb.Agent.OnStatus = func(s device.Status) {
		if s.Phase == device.PhaseConnected {
			once.Do(func() { <-release }) // the loop hangs where no bounded call covers it
		}
	}
	tb.Start()
	require.Eventually(t, func() bool { return tb.Hub.Last() != nil }, 5*time.Second, time.Millisecond)
	// A ping answered before the loop hung may still go out: wait until none has for three
	// watchdog periods.
	stuck := tb.Notify.Count("WATCHDOG=1")
	require.Eventually(t, func() bool {
		n := tb.Notify.Count("WATCHDOG=1")
		stopped := n == stuck
		stuck = n
		return stopped
	}, 5*time.Second, 3*tb.Agent.Watchdog)
	assert.Never(t, func() bool { return tb.Notify.Count("WATCHDOG=1") > stuck }, 200*time.Millisecond, 5*time.Millisecond,
		"no WATCHDOG=1 while the loop is stuck")
	close(release)
	require.Eventually(t, func() bool { return tb.Notify.Count("WATCHDOG=1") > stuck }, 5*time.Second, time.Millisecond,
		"pings resume with the loop")
}

// A symmetric-key device: the key reaches the hub, the state is bound to a digest of it, and a
// new key (rotated in the enrollment and installed) makes the agent register again.
func TestSymmetricKeyDevice(t *testing.T) {
	tb := devicetest.New(t)
	key, rotated := bytes.Repeat([]byte{9}, 32), bytes.Repeat([]byte{10}, 32)
	path := device.WriteKeyFile(t, base64.StdEncoding.EncodeToString(key), 0o600)
	tb.Config.Attestation = config.Attestation{Method: "symmetric_key", SymmetricKey: path}
	tb.Config.Provisioning.RegistrationID = "gw-0001"

	tb.Start()
	tb.WaitPhase(device.PhaseConnected)
	require.NoError(t, tb.Stop())
	st := tb.LoadState()
	assert.Equal(t, device.SymmetricKeyBinding(key), st.Binding)
	ids := tb.Hub.IDs()
	assert.Equal(t, key, ids[0].SymmetricKey)
	assert.Nil(t, ids[0].X509)
	assert.Equal(t, 1, tb.DPS.Calls())

	require.NoError(t, os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(rotated)), 0o600))
	tb.Agent = tb.NewAgent()
	tb.Start()
	tb.WaitPhase(device.PhaseConnected)
	assert.Equal(t, 2, tb.DPS.Calls(), "the state belonged to the old key")
	assert.Equal(t, device.SymmetricKeyBinding(rotated), tb.LoadState().Binding)
	assert.Contains(t, tb.Agent.Status().LastError, "belongs to another identity")
	for _, form := range []string{base64.StdEncoding.EncodeToString(key), base64.StdEncoding.EncodeToString(rotated)} {
		assert.NotContains(t, fmt.Sprintf("%+v", tb.Agent.Status()), form)
	}
}
