package reliability_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/internal/faultrun"
	"github.com/unicity-iot/unicity/internal/poll"
	"github.com/unicity-iot/unicity/localapi"
)

// TestTelemetrySurvivesSIGKILL SIGKILLs the real agent at random moments while an
// application submits through the local API (answered once durable, or after the PUBACK),
// 20 times (200 in the long form); afterwards every message the agent acknowledged to the
// application arrives at the emulator's hub at least once.
func TestTelemetrySurvivesSIGKILL(t *testing.T) {
	rounds := faultrun.Rounds(20, 200)
	rng := faultrun.Rand(t, 170)
	e := startEmulator(t)
	g := x509Gateway(t, e, "gw-telemetry", "")
	socket := filepath.Join(g.run, localapi.SocketName)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}}}

	var mu sync.Mutex
	acked := map[string]bool{}
	submit := func(mid, query string) bool {
		body := fmt.Sprintf(`{"payload":{"mid":%q},"properties":{"$.mid":%q}}`, mid, mid)
		resp, err := client.Post("http://unicity/v1/telemetry"+query, "application/json", strings.NewReader(body))
		if err != nil {
			return false
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusAccepted {
			mu.Lock()
			acked[mid] = true
			mu.Unlock()
			return true
		}
		return false
	}

	// The emulator keeps each hub's last hubtest.MaxRecorded messages: what arrived is read
	// after every round, while fewer than that have come since, and kept here.
	mid := regexp.MustCompile(`"\$\.mid":"([^"]+)"`)
	arrived := map[string]bool{}
	collect := func() {
		got, err := exec.Command(e.bin, "telemetry", "--dir", e.dir, "--device", "gw-telemetry").Output()
		require.NoError(t, err)
		for _, m := range mid.FindAllSubmatch(got, -1) {
			arrived[string(m[1])] = true
		}
	}

	for round := range rounds {
		ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
		agent, out, exited := g.runAgent(t, ctx)
		// The first answer tells that the store is open; kills then land among submissions.
		require.NoError(t, poll.Until(ctx, 20*time.Millisecond, func() bool { return submit(fmt.Sprintf("r%d-first", round), "?wait=0") }),
			"round %d: the agent never took a message: %s", round, out)
		stop := make(chan struct{})
		var apps sync.WaitGroup
		for app, query := range []string{"?wait=0", "?timeout=2s"} {
			apps.Go(func() {
				for n := 0; ; n++ {
					select {
					case <-stop:
						return
					default:
					}
					submit(fmt.Sprintf("r%d-a%d-%d", round, app, n), query)
				}
			})
		}
		time.Sleep(time.Duration(rng.Int64N(int64(400 * time.Millisecond)))) // the random kill point is what this tests
		require.NoError(t, agent.Process.Signal(syscall.SIGKILL))
		<-exited
		close(stop)
		apps.Wait()
		cancel()
		collect()
	}

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	agent, out, exited := g.runAgent(t, ctx)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)
	var missing []string
	err := poll.Until(ctx, 200*time.Millisecond, func() bool {
		collect()
		missing = missing[:0]
		for m := range acked {
			if !arrived[m] {
				missing = append(missing, m)
			}
		}
		return len(missing) == 0
	})
	require.NoError(t, err, "%d of %d acknowledged messages never arrived, such as %v: %s", len(missing), len(acked), missing[:min(5, len(missing))], out)
	cfg, err := config.Load(g.config)
	require.NoError(t, err)
	st, err := localapi.NewClient(cfg).Status(ctx)
	require.NoError(t, err)
	agent.Process.Signal(os.Interrupt)
	<-exited
	stats, _ := json.Marshal(st.Telemetry)
	t.Logf("%d SIGKILLs among submissions; %d messages acknowledged to the application, all arrived; queue after: %s", rounds, len(acked), stats)
}
