package spool

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/faultrun"
)

// crashOptions make segments small, so that kills land while segments are begun and removed.
var crashOptions = Options{MaxBytes: 4 << 20, SegmentBytes: 4 << 10}

// TestSurvivesSIGKILL runs a real process that appends from four goroutines and sends with a
// window of acknowledgements out of order, SIGKILLs it at random moments, and reopens the
// spool after each kill: every message whose Append had returned and that was not
// acknowledged is there, once, in order per application, and no file is corrupt. 20 kills;
// 200 with RELIABILITY_LONG=1 (make reliability).
func TestSurvivesSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	kills := faultrun.Rounds(20, 200)
	rng := faultrun.Rand(t, 2)

	dir := t.TempDir()
	// What was appended and never acknowledged must survive. A message may be acknowledged
	// before its appender reports it: the sets are compared, not the order of the lines.
	appended, acked := map[string]bool{}, map[string]bool{}
	var torn, maxDepth int
	for round := range kills {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperCrashChild$")
		cmd.Env = append(os.Environ(), "SPOOL_CRASH_DIR="+dir, "SPOOL_CRASH_ROUND="+strconv.Itoa(round))
		out, err := cmd.StdoutPipe()
		require.NoError(t, err)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		require.NoError(t, cmd.Start())
		lines := bufio.NewScanner(out)
		ready := make(chan struct{})
		readDone := make(chan struct{})
		var mu sync.Mutex
		go func() {
			defer close(readDone)
			first := true
			for lines.Scan() {
				op, mid, _ := strings.Cut(lines.Text(), " ")
				mu.Lock()
				switch op {
				case "A":
					appended[mid] = true
				case "K":
					acked[mid] = true
				}
				mu.Unlock()
				if first {
					close(ready)
					first = false
				}
			}
		}()
		// One kill in ten lands early, during Open's recovery; the others while appending.
		if rng.IntN(10) > 0 {
			select {
			case <-ready:
			case <-time.After(10 * time.Second):
				t.Fatalf("round %d: the child never appended: %s", round, stderr.String())
			}
		}
		time.Sleep(time.Duration(rng.Int64N(int64(60 * time.Millisecond))))
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		<-readDone
		_ = cmd.Wait()
		assert.NotContains(t, stderr.String(), "FAIL", "round %d", round)

		mu.Lock()
		must := map[string]bool{}
		for mid := range appended {
			if !acked[mid] {
				must[mid] = true
			}
		}
		t1 := checkSpool(t, dir, must, round)
		torn += t1.torn
		maxDepth = max(maxDepth, t1.depth)
		mu.Unlock()
		if t.Failed() {
			return
		}
	}
	t.Logf("%d kills: %d messages appended, %d acknowledged, %d stored at most, %d torn tails dropped", kills, len(appended), len(acked), maxDepth, torn)
	assert.Greater(t, len(appended), kills, "the child appended")
}

type crashCheck struct{ torn, depth int }

// checkSpool opens the spool after a kill and reads everything in it without acknowledging.
func checkSpool(t *testing.T, dir string, mustHave map[string]bool, round int) crashCheck {
	t.Helper()
	s, err := Open(dir, crashOptions)
	require.NoError(t, err, "round %d", round)
	defer s.Close()
	st := s.Stats()
	assert.Zero(t, st.SetAside, "round %d: a file was unusable", round)
	aside, _ := filepath.Glob(filepath.Join(dir, "*.corrupt-*"))
	assert.Empty(t, aside, "round %d", round)

	seen := map[string]bool{}
	last := map[string]int{}
	for range st.Messages {
		r := next(t, s)
		mid := r.Properties["$.mid"]
		assert.False(t, seen[mid], "round %d: %s stored twice", round, mid)
		seen[mid] = true
		n, err := strconv.Atoi(r.Properties["seq"])
		require.NoError(t, err)
		if prev, ok := last[r.App]; ok {
			assert.Greater(t, n, prev, "round %d: %s out of order", round, mid)
		}
		last[r.App] = n
		assert.Equal(t, fmt.Sprintf("%s %d", r.App, n), string(r.Payload), "round %d", round)
	}
	empty(t, s)
	for mid := range mustHave {
		assert.True(t, seen[mid], "round %d: %s was appended, never acknowledged, and is gone", round, mid)
	}
	return crashCheck{torn: int(st.Torn), depth: st.Messages}
}

// TestHelperCrashChild is the process TestSurvivesSIGKILL kills. It reports "A mid" after
// an Append returned and "K mid" before it acknowledges one.
func TestHelperCrashChild(t *testing.T) {
	dir := os.Getenv("SPOOL_CRASH_DIR")
	if dir == "" {
		t.Skip("the child of TestSurvivesSIGKILL")
	}
	round, _ := strconv.Atoi(os.Getenv("SPOOL_CRASH_ROUND"))
	s, err := Open(dir, crashOptions)
	if err != nil {
		fmt.Fprintln(os.Stderr, "FAIL open:", err)
		os.Exit(1)
	}
	report := func(op, mid string) {
		// One write(2) per line: on its way before the next step, and never interleaved.
		os.Stdout.WriteString(op + " " + mid + "\n")
	}
	for w := range 4 {
		go func() {
			app := "w" + strconv.Itoa(w)
			for n := round * 1_000_000; ; n++ {
				m := Message{
					App:        app,
					Properties: map[string]string{"$.mid": app + "-" + strconv.Itoa(n), "seq": strconv.Itoa(n)},
					Payload:    []byte(fmt.Sprintf("%s %d", app, n)),
				}
				if _, err := s.Append(context.Background(), m); err != nil {
					fmt.Fprintln(os.Stderr, "FAIL append:", err)
					os.Exit(1)
				}
				report("A", m.Properties["$.mid"])
			}
		}()
	}
	rng := rand.New(rand.NewPCG(uint64(round), 3))
	var window []Record
	for {
		r, err := s.Next(context.Background())
		if err != nil {
			fmt.Fprintln(os.Stderr, "FAIL next:", err)
			os.Exit(1)
		}
		window = append(window, r)
		for len(window) > 0 && (len(window) >= 16 || rng.IntN(3) == 0) {
			i := rng.IntN(len(window))
			report("K", window[i].Properties["$.mid"])
			if err := s.Ack(window[i].ID); err != nil {
				fmt.Fprintln(os.Stderr, "FAIL ack:", err)
				os.Exit(1)
			}
			window = append(window[:i], window[i+1:]...)
		}
		if rng.IntN(50) == 0 { // a reconnect
			window = nil
			s.Requeue()
		}
	}
}
