package storage

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/atomicfile"
)

func sample(hub string) *State {
	return &State{
		RegistrationID: "gw-0001",
		Binding:        "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08",
		AssignedHub:    hub,
		DeviceID:       "gw-0001",
		Substatus:      "initialAssignment",
		Transport:      "mqtt",
		Payload:        json.RawMessage(`{"site":"north"}`),
		IssuedChain:    [][]byte{{0x30, 0x82, 0x01}},
		OperationalKey: "tpmkey:/var/lib/unicity/operational-X.key",
		ProvisionedAt:  time.Date(2026, 11, 23, 15, 0, 0, 0, time.UTC),
		Attempts:       2,
		Duration:       1500 * time.Millisecond,
	}
}

func lock(t *testing.T, s *Store) *Locked {
	t.Helper()
	l, err := s.TryLock()
	require.NoError(t, err)
	t.Cleanup(func() { l.Unlock() })
	return l
}

func TestStateBeforeOperationalKeysLoads(t *testing.T) {
	dir := t.TempDir()
	old := `{"version":1,"registration_id":"gw-0001","cert_sha256":"AB","assigned_hub":"hub-a","device_id":"gw-0001","provisioned_at":"2026-11-23T15:00:00Z"}`
	require.NoError(t, os.WriteFile(filepath.Join(dir, FileName), []byte(old), 0o600))
	st, err := New(dir).Load()
	require.NoError(t, err)
	assert.Empty(t, st.OperationalKey)
	assert.Empty(t, st.IssuedChain)
}

func TestSaveLoadRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	s := New(dir)
	l := lock(t, s)

	_, err := l.Load()
	require.ErrorIs(t, err, ErrNotExist)
	_, err = s.Load()
	require.ErrorIs(t, err, ErrNotExist)

	want := sample("hub-a.azure-devices.net")
	require.NoError(t, l.Save(want))
	assert.Equal(t, Version, want.Version)

	for name, load := range map[string]func() (*State, error){"locked": l.Load, "unlocked": s.Load} {
		got, err := load()
		require.NoError(t, err, name)
		assert.Equal(t, want, got, name)
	}

	fi, err := os.Stat(s.Path())
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "state file mode")
	di, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), di.Mode().Perm(), "state directory mode")
}

func TestSaveReplacesAndLeavesNoTemporaryFiles(t *testing.T) {
	s := New(t.TempDir())
	l := lock(t, s)
	require.NoError(t, l.Save(sample("hub-a")))
	require.NoError(t, l.Save(sample("hub-b")))
	got, err := s.Load()
	require.NoError(t, err)
	assert.Equal(t, "hub-b", got.AssignedHub)
	leftovers, _ := filepath.Glob(atomicfile.TempGlob(s.Path()))
	assert.Empty(t, leftovers)
}

func TestSaveRefusesIncompleteState(t *testing.T) {
	s := New(t.TempDir())
	l := lock(t, s)
	require.NoError(t, l.Save(sample("hub-a")))
	bad := sample("")
	require.Error(t, l.Save(bad))
	got, err := s.Load()
	require.NoError(t, err)
	assert.Equal(t, "hub-a", got.AssignedHub, "a refused save keeps the old assignment")
}

func TestBelongsTo(t *testing.T) {
	st := sample("hub-a")
	tests := []struct {
		name, regID, thumb string
		want               bool
	}{
		{"same", "gw-0001", st.Binding, true},
		{"registration ID case-insensitive", "GW-0001", st.Binding, true},
		{"thumbprint case-insensitive", "gw-0001", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", true},
		{"other certificate", "gw-0001", "00" + st.Binding[2:], false},
		{"other device (cloned image)", "gw-0002", st.Binding, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, st.BelongsTo(tt.regID, tt.thumb))
		})
	}
}

func TestCorruptStateIsSetAside(t *testing.T) {
	tests := []struct {
		name string
		body string
	}{
		{"truncated", `{"version":1,"registration_id":"gw`},
		{"not JSON", "\x00\x00\x00\x00"},
		{"empty", ""},
		{"trailing data", `{"version":1,"registration_id":"a","cert_sha256":"b","assigned_hub":"h","device_id":"d"} {}`},
		{"future version", `{"version":9,"registration_id":"a","cert_sha256":"b","assigned_hub":"h","device_id":"d"}`},
		{"no assignment", `{"version":1,"registration_id":"a","cert_sha256":"b"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(t.TempDir())
			require.NoError(t, os.WriteFile(s.Path(), []byte(tt.body), 0o600))

			_, err := s.Load()
			require.ErrorIs(t, err, ErrCorrupt)
			_, err = os.Stat(s.Path())
			require.NoError(t, err, "an unlocked reader leaves the file in place")

			l := lock(t, s)
			_, loadErr := l.Load()
			require.ErrorIs(t, loadErr, ErrCorrupt)
			_, err = os.Stat(s.Path())
			require.ErrorIs(t, err, os.ErrNotExist)
			aside, _ := filepath.Glob(s.Path() + ".corrupt-*")
			require.Len(t, aside, 1)
			assert.Contains(t, loadErr.Error(), aside[0])
			kept, err := os.ReadFile(aside[0])
			require.NoError(t, err)
			assert.Equal(t, tt.body, string(kept), "the corrupt file is kept byte for byte")

			_, err = l.Load()
			require.ErrorIs(t, err, ErrNotExist, "after setting aside, the device is simply unprovisioned")
		})
	}
}

func TestUnreadableStateIsSetAside(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root reads files whatever their mode")
	}
	s := New(t.TempDir())
	require.NoError(t, os.WriteFile(s.Path(), []byte("{}"), 0o000))
	l := lock(t, s)
	_, err := l.Load()
	require.ErrorIs(t, err, ErrCorrupt)
	aside, _ := filepath.Glob(s.Path() + ".corrupt-*")
	assert.Len(t, aside, 1)
}

func TestLockIsExclusive(t *testing.T) {
	s := New(t.TempDir())
	l, err := s.TryLock()
	require.NoError(t, err)

	_, err = s.TryLock()
	require.ErrorIs(t, err, ErrLocked)

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = New(s.dir).Lock(ctx)
	require.ErrorIs(t, err, ErrLocked, "Lock gives up when its context ends")

	got := make(chan error, 1)
	go func() {
		l2, err := s.Lock(context.Background())
		if err == nil {
			err = l2.Unlock()
		}
		got <- err
	}()
	require.NoError(t, l.Unlock())
	select {
	case err := <-got:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Lock did not get the lock once it was released")
	}
}

func TestLockRemovesStaleTemporaryFiles(t *testing.T) {
	s := New(t.TempDir())
	stale := filepath.Join(s.dir, ".state.json.tmp-123")
	require.NoError(t, os.WriteFile(stale, []byte(`{"version":1`), 0o600))
	lock(t, s)
	_, err := os.Stat(stale)
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestCheckWritableLeavesNothing(t *testing.T) {
	s := New(t.TempDir())
	require.NoError(t, lock(t, s).CheckWritable())
	left, err := os.ReadDir(s.dir)
	require.NoError(t, err)
	require.Len(t, left, 1)
	assert.Equal(t, lockName, left[0].Name(), "only the lock file")
}

// TestSaveSurvivesSIGKILL kills a process that keeps replacing the state, at random points,
// and checks that the file left behind is always one complete state from that process.
func TestSaveSurvivesSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	dir := t.TempDir()
	s := New(dir)
	l := lock(t, s)
	require.NoError(t, l.Save(sample("hub-a")))
	require.NoError(t, l.Unlock())

	const rounds = 20
	seen := map[string]bool{}
	for round := range rounds {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperSaveLoop$")
		cmd.Env = append(os.Environ(), "STORAGE_SAVE_LOOP="+dir, "STORAGE_SAVE_ROUND="+strconv.Itoa(round))
		out, err := cmd.StdoutPipe()
		require.NoError(t, err)
		require.NoError(t, cmd.Start())
		// The helper says when it has saved once; from then on it is always mid-save or
		// between two saves.
		_, err = out.Read(make([]byte, 1))
		require.NoError(t, err, "round %d: the helper never saved", round)
		time.Sleep(time.Duration(round%7) * time.Millisecond)
		require.NoError(t, cmd.Process.Kill())
		_ = cmd.Wait()

		got, err := s.Load()
		require.NoError(t, err, "round %d", round)
		assert.Contains(t, []string{"hub-a", "hub-b"}, got.AssignedHub, "round %d", round)
		round0, _, _ := strings.Cut(got.Substatus, "/")
		assert.Equal(t, strconv.Itoa(round), round0, "the state is one this round's writer saved")
		seen[got.Substatus] = true
	}
	assert.Len(t, seen, rounds)
}

func TestHelperSaveLoop(t *testing.T) {
	dir := os.Getenv("STORAGE_SAVE_LOOP")
	if dir == "" {
		t.Skip("helper process for TestSaveSurvivesSIGKILL")
	}
	l, err := New(dir).Lock(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	round := os.Getenv("STORAGE_SAVE_ROUND")
	for i := 0; ; i++ {
		st := sample("hub-" + string(rune('a'+i%2)))
		st.Attempts = i
		st.Substatus = round + "/" + strconv.Itoa(i)
		if err := l.Save(st); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if i == 0 {
			os.Stdout.WriteString("saved\n")
		}
	}
}

func TestOperationalKeys(t *testing.T) {
	assert.Empty(t, (&State{}).OperationalKeys())
	st := &State{OperationalKey: "tpmkey:a.key"}
	assert.Equal(t, []string{"tpmkey:a.key"}, st.OperationalKeys())
	st.Renewal = &Renewal{OperationalKey: "tpmkey:b.key"}
	assert.Equal(t, []string{"tpmkey:a.key", "tpmkey:b.key"}, st.OperationalKeys(), "the one in force, then the one on trial")
}
