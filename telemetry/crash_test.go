package telemetry_test

import (
	"bufio"
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/faultrun"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/telemetry"
)

const (
	crashDevice = "gw-killed"
	// Small segments, so that kills land while segments are begun and removed.
	crashMaxBytes = 1 << 20
)

// TestSurvivesSIGKILL runs a real process that submits telemetry from two applications and
// forwards it to the emulated hub over TLS, SIGKILLs it at random moments, and starts it
// again; finally this process opens the store and delivers what is left. Every message whose
// Submit had returned to its application (stored, or with a wait delivered) arrives at the
// hub at least once. 20 kills; 200 with RELIABILITY_LONG=1 (make reliability).
func TestSurvivesSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	kills := faultrun.Rounds(20, 200)
	rng := faultrun.Rand(t, 17)

	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cfg := ca.config(t, srv, crashDevice)
	creds := t.TempDir()
	require.NoError(t, ca.Save(filepath.Join(creds, "ca.pem"), filepath.Join(creds, "ca.key")))
	require.NoError(t, os.WriteFile(filepath.Join(creds, "hub.pem"), srv.TrustBundle(), 0o600))
	dir := t.TempDir()

	// The hub keeps its last hubtest.MaxRecorded messages: what arrived is gathered after
	// every round, far fewer.
	acked, arrived := map[string]bool{}, map[string]bool{}
	gather := func() {
		for _, mid := range mids(srv.Telemetry(crashDevice)) {
			arrived[mid] = true
		}
	}
	for round := range kills {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperKilledAgent$")
		cmd.Env = append(os.Environ(), "TELEMETRY_CRASH_DIR="+dir, "TELEMETRY_CRASH_CREDS="+creds,
			"TELEMETRY_CRASH_HUB="+srv.Name(), "TELEMETRY_CRASH_ROUND="+strconv.Itoa(round))
		out, err := cmd.StdoutPipe()
		require.NoError(t, err)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		require.NoError(t, cmd.Start())
		ready, lines := make(chan struct{}), make(chan []string)
		go func() {
			var got []string
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if mid, ok := strings.CutPrefix(sc.Text(), "A "); ok {
					if got = append(got, mid); len(got) == 1 {
						close(ready)
					}
				}
			}
			lines <- got
		}()
		// One kill in ten lands early, while the store recovers or the client connects.
		if rng.IntN(10) > 0 {
			select {
			case <-ready:
			case <-time.After(20 * time.Second):
				t.Fatalf("round %d: the child never submitted: %s", round, stderr.String())
			}
		}
		time.Sleep(time.Duration(rng.Int64N(int64(150 * time.Millisecond))))
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		for _, mid := range <-lines {
			acked[mid] = true
		}
		_ = cmd.Wait()
		require.NotContains(t, stderr.String(), "FAIL", "round %d", round)
		gather()
	}

	// The agent starts for good, the link is up: the rest goes.
	st := open(t, telemetry.Options{Dir: dir, MaxBytes: crashMaxBytes})
	stats := st.Stats()
	assert.Zero(t, stats.SetAside, "no file found unusable")
	aside, _ := filepath.Glob(filepath.Join(dir, "*.corrupt-*"))
	assert.Empty(t, aside)
	left := stats.Messages
	q := hub.NewQueue(0, 0)
	connect(t, cfg, q)
	forward(t, st, q)
	drained(t, st)
	gather()

	var lost []string
	for mid := range acked {
		if !arrived[mid] {
			lost = append(lost, mid)
		}
	}
	slices.Sort(lost)
	assert.Empty(t, lost, "acknowledged to the application, never at the hub (%d of %d)", len(lost), len(acked))
	t.Logf("%d kills: %d messages acknowledged to the applications, %d arrived, %d left for the last start, %d torn tails at it",
		kills, len(acked), len(arrived), left, stats.Torn)
	assert.Greater(t, len(acked), kills, "the child submitted")
}

// TestHelperKilledAgent is the process TestSurvivesSIGKILL kills: the agent's telemetry
// path, a store forwarding to a hub client, and two applications submitting. It prints
// "A mid" when a Submit has returned: one application answered once stored, the other once
// delivered.
func TestHelperKilledAgent(t *testing.T) {
	dir := os.Getenv("TELEMETRY_CRASH_DIR")
	if dir == "" {
		t.Skip("the child of TestSurvivesSIGKILL")
	}
	fail := func(what string, err error) {
		fmt.Fprintf(os.Stderr, "FAIL %s: %v\n", what, err)
		os.Exit(1)
	}
	creds := os.Getenv("TELEMETRY_CRASH_CREDS")
	ca, err := pki.LoadCA(filepath.Join(creds, "ca.pem"), filepath.Join(creds, "ca.key"))
	if err != nil {
		fail("load the device CA", err)
	}
	leaf, err := ca.NewDevice(crashDevice)
	if err != nil {
		fail("issue the device certificate", err)
	}
	roots, err := certcodec.ReadCertificates(filepath.Join(creds, "hub.pem"))
	if err != nil {
		fail("read the hub's root", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(roots[0])
	cert := leaf.TLSCertificate()

	st, err := telemetry.Open(telemetry.Options{Dir: dir, MaxBytes: crashMaxBytes})
	if err != nil {
		fail("open", err)
	}
	q := hub.NewQueue(0, 0)
	c, err := hub.New(hub.Config{
		Hub: os.Getenv("TELEMETRY_CRASH_HUB"), DeviceID: crashDevice, Queue: q,
		Dial:    dial.Config{Transport: dial.TransportMQTT, RootCAs: pool, Certificate: &cert},
		Backoff: func(int) time.Duration { return 5 * time.Millisecond },
	})
	if err != nil {
		fail("hub client", err)
	}
	ctx := context.Background()
	go c.Run(ctx)
	go func() { fail("forward", st.Forward(ctx, q)) }()
	round := os.Getenv("TELEMETRY_CRASH_ROUND")
	for app, wait := range map[string]time.Duration{"stored": 0, "delivered": 20 * time.Second} {
		go func() {
			for n := 0; ; n++ {
				mid := "r" + round + "-" + app + "-" + strconv.Itoa(n)
				m := hub.Message{Payload: []byte(mid), Properties: map[string]string{hub.PropMessageID: mid}}
				if _, err := st.Submit(ctx, app, m, wait); err != nil {
					fail("submit", err)
				}
				// One write(2) per line: on its way before the next step, never interleaved.
				os.Stdout.WriteString("A " + mid + "\n")
			}
		}()
	}
	<-time.After(time.Minute) // killed long before, or orphaned
	fail("not killed", nil)
}
