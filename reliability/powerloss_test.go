package reliability_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/storage"
)

// TestPowerLoss SIGKILLs the real agent at random moments of a first boot (no state) and of
// a forced re-registration (state present), then checks the state directory as the next
// boot finds it: no state or a complete one, never a corrupt file; and the next boot
// converges (provisions, or keeps what it has). Every tenth iteration, and the last, the
// agent runs on to connected. The short form runs 12 iterations, the long form 200.
func TestPowerLoss(t *testing.T) {
	iterations := 12
	if long() {
		iterations = 200
	}
	// An assignment delay stretches the registration so that kills land inside it.
	e := startEmulator(t, "--assign-delay", "150ms", "--retry-after", "1", "--poll-limit", "0")
	g := x509Gateway(t, e, "gw-power", "")
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("RELIABILITY_SEED"); v != "" { // replays a failed run's kill times
		n, err := strconv.ParseUint(v, 10, 64)
		require.NoError(t, err)
		seed = n
	}
	t.Logf("seed %d (RELIABILITY_SEED replays it)", seed)
	rng := rand.New(rand.NewPCG(seed, 1))

	phases := map[string]int{}
	var firstBoot, reprovision, killedWithoutState, killedWithNew int
	for i := range iterations {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		prev, _ := storage.New(g.state).Load()
		var args []string
		if prev == nil || rng.IntN(2) == 0 {
			firstBoot++
			require.NoError(t, os.RemoveAll(g.state))
			prev = nil
			args = []string{"run"}
		} else {
			reprovision++
			args = []string{"reprovision", "--force"}
		}
		c, _ := g.command(ctx, args...)
		os.Remove(filepath.Join(g.run, device.StatusFileName))
		require.NoError(t, c.Start())
		// Up to 3 s covers start-up, the lock, DPS (a register, a poll after the client's 2 s
		// floor), the save and the hub connection.
		time.Sleep(time.Duration(rng.Int64N(int64(3 * time.Second))))
		phase := "exited"
		if s, err := device.ReadStatus(g.run); err == nil && args[0] == "run" {
			phase = string(s.Phase)
		} else if args[0] != "run" {
			phase = "reprovision"
		}
		require.NoError(t, c.Process.Signal(syscall.SIGKILL))
		c.Wait()
		cancel()
		phases[phase]++

		st, err := storage.New(g.state).Load()
		switch {
		case errors.Is(err, storage.ErrNotExist):
			require.Nil(t, prev, "iteration %d: a state that existed is gone", i)
			killedWithoutState++
		case err != nil:
			t.Fatalf("iteration %d (%s, killed at %s): %v", i, args[0], phase, err)
		default:
			assert.Equal(t, "gw-power", st.DeviceID)
			assert.NotEmpty(t, st.AssignedHub)
			if prev != nil && !st.ProvisionedAt.Equal(prev.ProvisionedAt) {
				killedWithNew++
			}
		}
		aside, _ := filepath.Glob(filepath.Join(g.state, storage.FileName+".corrupt-*"))
		require.Empty(t, aside, "iteration %d: a corrupt state was set aside", i)
		info, err := os.Stat(filepath.Join(g.state, storage.FileName))
		if err == nil {
			assert.Equal(t, os.FileMode(0o600), info.Mode().Perm())
		}

		// The next boot converges.
		if i%10 == 9 || i == iterations-1 {
			runCtx, runCancel := context.WithTimeout(context.Background(), 60*time.Second)
			agent, out, exited := g.runAgent(t, runCtx)
			g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)
			agent.Process.Signal(os.Interrupt)
			<-exited
			runCancel()
			require.Contains(t, out.String(), "msg=stopped", "iteration %d", i)
		} else {
			pctx, pcancel := context.WithTimeout(context.Background(), 30*time.Second)
			c, out := g.command(pctx, "provision", "--json")
			require.NoError(t, c.Run(), "iteration %d: provision after the kill: %s", i, out)
			pcancel()
			assert.Contains(t, out.String(), `"assigned_hub"`)
		}
		tmp, _ := filepath.Glob(filepath.Join(g.state, ".state.json.tmp-*"))
		assert.Empty(t, tmp, "the next boot removes a killed writer's temporary file")
	}
	var seen []string
	for p, n := range phases {
		seen = append(seen, p+"="+strconv.Itoa(n))
	}
	sort.Strings(seen)
	t.Logf("%d SIGKILLs (%d first boots, %d re-registrations); killed at: %s; %d first boots left no state, %d re-registrations had stored the new state",
		iterations, firstBoot, reprovision, strings.Join(seen, " "), killedWithoutState, killedWithNew)
	if long() {
		assert.GreaterOrEqual(t, phases[string(device.PhaseProvisioning)], 10, "kills landed during registration")
	}
}
