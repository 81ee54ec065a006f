package storage

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzStateFile reads whatever a power cut, a bad SD card or a hand edit may leave as the
// state file: nothing panics; a file is either a state that passes the checks and saves
// back to an equal state, or ErrCorrupt.
func FuzzStateFile(f *testing.F) {
	valid := `{"version":1,"registration_id":"gw-0001","cert_sha256":"9F86D0","assigned_hub":"h.azure-devices.net","device_id":"gw-0001"}`
	f.Add([]byte(valid + "\n"))
	f.Add([]byte(`{"version":1,"registration_id":"a","cert_sha256":"b","assigned_hub":"h","device_id":"d","payload":{"x":[1,2]},"issued_chain":["MIIB"],"provisioned_at":"2026-11-23T15:00:00Z","duration_ns":-5}`))
	f.Add([]byte(valid[:40]))
	f.Add([]byte(valid + " {}"))
	f.Add([]byte(`{"version":1,"registration_id":"a","cert_sha256":"b","assigned_hub":"h","device_id":"d","payload":"not an object"}`))
	f.Add([]byte("\x00\x00\x00"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		s := New(filepath.Join(dir, "s"))
		os.RemoveAll(s.dir)
		if err := os.Mkdir(s.dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(s.Path(), data, 0o600); err != nil {
			t.Fatal(err)
		}
		st, err := s.Load()
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("not ErrCorrupt: %v", err)
			}
			return // set aside byte for byte under the lock: TestCorruptStateIsSetAside
		}
		l, err := s.TryLock()
		if err != nil {
			t.Fatal(err)
		}
		defer l.Unlock()
		if err := st.check(); err != nil {
			t.Fatalf("accepted a state that fails its check: %v", err)
		}
		if err := l.Save(st); err != nil {
			t.Fatalf("an accepted state does not save: %v", err)
		}
		again, err := l.Load()
		if err != nil {
			t.Fatalf("a saved state does not load: %v", err)
		}
		if !again.BelongsTo(st.RegistrationID, st.Binding) || again.AssignedHub != st.AssignedHub || again.DeviceID != st.DeviceID {
			t.Fatalf("round trip changed the state: %+v != %+v", again, st)
		}
	})
}
