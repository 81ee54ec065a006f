package main

import (
	"bufio"
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/atomicfile"
)

// stateFile keeps what the services know of their devices across restarts, so that a
// restart is an outage rather than a factory reset: the hubs' registries (credentials,
// status), twins with their versions, unacknowledged cloud-to-device messages, CleanSession 0
// sessions, recorded telemetry; DPS's registration records and register-request history; and
// where each service listened, so that hub names and addresses stay what devices stored.
//
// It is a log of JSON lines, each the latest state of one thing ("a device now looks like
// this"), written before the change is acknowledged. Appending a line is the only write while
// serving, so a kill at any point leaves every complete line readable; a torn last line is
// dropped when the file is next opened. The file is rewritten with only the live lines, into
// a new file renamed over the old, when it opens and when it has grown to twice their size.
const stateFile = "state.jsonl"

const (
	stateVersion = 1
	// compactAbove is the size below which the file is never rewritten while serving.
	compactAbove = 4 << 20
)

// stateRecord is one line: exactly one field is set.
type stateRecord struct {
	Version             int                   `json:"version,omitempty"`
	Layout              *layoutRecord         `json:"layout,omitempty"`
	Device              *deviceRecord         `json:"device,omitempty"`
	DeviceDeleted       *deviceDeletedRecord  `json:"device_deleted,omitempty"`
	Telemetry           *telemetryRecord      `json:"telemetry,omitempty"`
	Registration        *dpstest.Registration `json:"registration,omitempty"`
	RegistrationDeleted string                `json:"registration_deleted,omitempty"`
	Attempt             *dpstest.Attempt      `json:"attempt,omitempty"`
}

// layoutRecord is where the services listened.
type layoutRecord struct {
	DPS   string            `json:"dps"`
	DPSWS string            `json:"dps_ws,omitempty"`
	Hubs  []hubLayoutRecord `json:"hubs"`
}

type hubLayoutRecord struct {
	Name string `json:"name"`
	Addr string `json:"addr"`
	WS   string `json:"ws,omitempty"`
}

// deviceRecord is a hubtest.DeviceState on the hub that holds the device; certificates are
// DER.
type deviceRecord struct {
	Hub             string               `json:"hub"`
	ID              string               `json:"id"`
	CAs             [][]byte             `json:"cas,omitempty"`
	Thumbprints     []string             `json:"thumbprints,omitempty"`
	Issued          [][]byte             `json:"issued,omitempty"` // operational certificates
	SymmetricKeys   [][]byte             `json:"symmetric_keys,omitempty"`
	Disabled        bool                 `json:"disabled,omitempty"`
	Desired         map[string]any       `json:"desired"`
	Reported        map[string]any       `json:"reported"`
	DesiredVersion  int                  `json:"desired_version"`
	ReportedVersion int                  `json:"reported_version"`
	C2D             []hubtest.C2DMessage `json:"c2d,omitempty"`
	Persistent      bool                 `json:"persistent,omitempty"`
	Subscriptions   map[string]byte      `json:"subscriptions,omitempty"`
	ClientType      string               `json:"client_type,omitempty"`
	ModelID         string               `json:"model_id,omitempty"`
	APIVersion      string               `json:"api_version,omitempty"`
	LastSeen        time.Time            `json:"last_seen,omitzero"`
}

type deviceDeletedRecord struct {
	Hub string `json:"hub"`
	ID  string `json:"id"`
}

type telemetryRecord struct {
	Hub        string            `json:"hub"`
	DeviceID   string            `json:"device_id"`
	Payload    []byte            `json:"payload"`
	Properties map[string]string `json:"properties,omitempty"`
	System     map[string]string `json:"system,omitempty"`
	QoS        byte              `json:"qos"`
	Received   time.Time         `json:"received"`
}

func newDeviceRecord(hub string, d hubtest.DeviceState) *deviceRecord {
	r := &deviceRecord{Hub: hub, ID: d.ID, Thumbprints: d.Thumbprints, SymmetricKeys: d.SymmetricKeys,
		Disabled: d.Disabled, Desired: d.Twin.Desired, Reported: d.Twin.Reported, DesiredVersion: d.Twin.DesiredVersion,
		ReportedVersion: d.Twin.ReportedVersion, C2D: d.C2D, Persistent: d.Persistent, Subscriptions: d.Subscriptions,
		ClientType: d.ClientType, ModelID: d.ModelID, APIVersion: d.APIVersion, LastSeen: d.LastSeen}
	for _, ca := range d.CAs {
		r.CAs = append(r.CAs, ca.Raw)
	}
	for _, c := range d.Issued {
		r.Issued = append(r.Issued, c.Raw)
	}
	return r
}

func (r *deviceRecord) state() (hubtest.DeviceState, error) {
	d := hubtest.DeviceState{Device: hubtest.Device{ID: r.ID, Thumbprints: r.Thumbprints, SymmetricKeys: r.SymmetricKeys,
		Disabled: r.Disabled}, Twin: hubtest.Twin{Desired: r.Desired, Reported: r.Reported, DesiredVersion: r.DesiredVersion,
		ReportedVersion: r.ReportedVersion}, C2D: r.C2D, Persistent: r.Persistent, Subscriptions: r.Subscriptions,
		ClientType: r.ClientType, ModelID: r.ModelID, APIVersion: r.APIVersion, LastSeen: r.LastSeen}
	for _, list := range []struct {
		ders [][]byte
		to   *[]*x509.Certificate
	}{{r.CAs, &d.CAs}, {r.Issued, &d.Issued}} {
		for _, der := range list.ders {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				return d, fmt.Errorf("device %q: %w", r.ID, err)
			}
			*list.to = append(*list.to, c)
		}
	}
	return d, nil
}

// restored is what a state file held when it was opened.
type restored struct {
	layout    *layoutRecord
	devices   map[string][]hubtest.DeviceState // by hub name
	telemetry map[string][]hubtest.Telemetry   // by hub name, oldest first
	regs      []dpstest.Registration
	attempts  []dpstest.Attempt // oldest first
	// skipped counts the lines that could not be read (a torn write).
	skipped int
}

// store is the open state file. It is the Journal of the hubs and of DPS. After a write
// fails it takes no more changes: failed is closed and err says why, so that serve stops
// rather than acknowledge what it cannot keep.
type store struct {
	path string

	mu        sync.Mutex
	f         *os.File
	size      int64             // of the file
	live      map[string][]byte // key → its latest line
	liveSize  int64             // of the lines in live and telemetry
	deviceHub map[string]string // device ID → the hub its live record is on
	telemetry map[string][][]byte
	attempts  []uint64 // live attempt sequence numbers, ascending
	err       error
	failed    chan struct{}
}

var (
	_ hubtest.Journal = (*store)(nil)
	_ dpstest.Journal = (*store)(nil)
)

// openStore reads the state file (none is an empty state), rewrites it with its live lines
// and opens it for appending. The caller holds the directory: a rewrite that a kill cut
// short left a temporary file, removed here.
func openStore(path string) (*store, *restored, error) {
	s := &store{path: path, live: map[string][]byte{}, deviceHub: map[string]string{},
		telemetry: map[string][][]byte{}, failed: make(chan struct{})}
	if stale, err := filepath.Glob(atomicfile.TempGlob(path)); err == nil {
		for _, f := range stale {
			os.Remove(f)
		}
	}
	skipped, err := s.load()
	if err != nil {
		return nil, nil, err
	}
	if err := s.compact(); err != nil {
		return nil, nil, fmt.Errorf("cannot rewrite %s: %w", path, err)
	}
	r, err := s.restored()
	if err != nil {
		s.close()
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	r.skipped = skipped
	return s, r, nil
}

func (s *store) load() (skipped int, err error) {
	f, err := os.Open(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.Close()
	br := bufio.NewReader(f)
	for n := 1; ; n++ {
		line, err := br.ReadBytes('\n')
		if errors.Is(err, io.EOF) {
			if len(bytes.TrimSpace(line)) > 0 {
				skipped++ // torn by a kill mid-write
			}
			return skipped, nil
		}
		if err != nil {
			return skipped, err
		}
		var rec stateRecord
		if json.Unmarshal(line, &rec) != nil {
			skipped++
			continue
		}
		if n == 1 {
			if rec.Version != stateVersion {
				return 0, fmt.Errorf("%s: unsupported version %d", s.path, rec.Version)
			}
			continue
		}
		s.apply(&rec, line)
	}
}

// apply makes rec, encoded as line, the live state of what it describes; s.mu is held or
// the store not yet shared.
func (s *store) apply(rec *stateRecord, line []byte) {
	put := func(key string) {
		s.liveSize += int64(len(line)) - int64(len(s.live[key]))
		s.live[key] = line
	}
	drop := func(key string) {
		s.liveSize -= int64(len(s.live[key]))
		delete(s.live, key)
	}
	switch {
	case rec.Layout != nil:
		put("layout")
	case rec.Device != nil:
		// A device is on one hub: its record on another (it moved) is replaced.
		put("device/" + rec.Device.ID)
		s.deviceHub[rec.Device.ID] = rec.Device.Hub
	case rec.DeviceDeleted != nil:
		if s.deviceHub[rec.DeviceDeleted.ID] == rec.DeviceDeleted.Hub {
			drop("device/" + rec.DeviceDeleted.ID)
			delete(s.deviceHub, rec.DeviceDeleted.ID)
		}
	case rec.Telemetry != nil:
		lines := s.telemetry[rec.Telemetry.Hub]
		if len(lines) == hubtest.MaxRecorded {
			s.liveSize -= int64(len(lines[0]))
			lines = lines[1:]
		}
		s.telemetry[rec.Telemetry.Hub] = append(lines, line)
		s.liveSize += int64(len(line))
	case rec.Registration != nil:
		put("registration/" + strings.ToLower(rec.Registration.RegistrationID))
	case rec.RegistrationDeleted != "":
		drop("registration/" + strings.ToLower(rec.RegistrationDeleted))
	case rec.Attempt != nil:
		key := "attempt/" + strconv.FormatUint(rec.Attempt.Seq, 10)
		if _, ok := s.live[key]; !ok {
			s.attempts = append(s.attempts, rec.Attempt.Seq)
			if len(s.attempts) > dpstest.MaxAttempts {
				drop("attempt/" + strconv.FormatUint(s.attempts[0], 10))
				s.attempts = s.attempts[1:]
			}
		}
		put(key)
	}
}

// compact replaces the file with one holding only the live lines and opens it for
// appending. s.mu is held or the store not yet shared.
func (s *store) compact() error {
	var buf bytes.Buffer
	header, _ := json.Marshal(stateRecord{Version: stateVersion})
	buf.Write(append(header, '\n'))
	keys := make([]string, 0, len(s.live))
	for k := range s.live {
		if !strings.HasPrefix(k, "attempt/") {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		buf.Write(s.live[k])
	}
	for _, seq := range s.attempts {
		buf.Write(s.live["attempt/"+strconv.FormatUint(seq, 10)])
	}
	hubs := make([]string, 0, len(s.telemetry))
	for h := range s.telemetry {
		hubs = append(hubs, h)
	}
	sort.Strings(hubs)
	for _, h := range hubs {
		for _, line := range s.telemetry[h] {
			buf.Write(line)
		}
	}
	if err := atomicfile.Write(s.path, buf.Bytes(), 0o600); err != nil {
		return err
	}
	if s.f != nil {
		s.f.Close()
	}
	f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	s.f, s.size = f, int64(buf.Len())
	return nil
}

// restored decodes the live lines.
func (s *store) restored() (*restored, error) {
	r := &restored{devices: map[string][]hubtest.DeviceState{}, telemetry: map[string][]hubtest.Telemetry{}}
	decode := func(line []byte) (*stateRecord, error) {
		var rec stateRecord
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.UseNumber() // twin numbers stay exact, as the hub keeps them
		return &rec, dec.Decode(&rec)
	}
	for key, line := range s.live {
		if strings.HasPrefix(key, "attempt/") {
			continue
		}
		rec, err := decode(line)
		if err != nil {
			return nil, err
		}
		switch {
		case rec.Layout != nil:
			r.layout = rec.Layout
		case rec.Device != nil:
			d, err := rec.Device.state()
			if err != nil {
				return nil, err
			}
			r.devices[rec.Device.Hub] = append(r.devices[rec.Device.Hub], d)
		case rec.Registration != nil:
			r.regs = append(r.regs, *rec.Registration)
		}
	}
	for _, seq := range s.attempts {
		rec, err := decode(s.live["attempt/"+strconv.FormatUint(seq, 10)])
		if err != nil {
			return nil, err
		}
		r.attempts = append(r.attempts, *rec.Attempt)
	}
	for hub, lines := range s.telemetry {
		for _, line := range lines {
			rec, err := decode(line)
			if err != nil {
				return nil, err
			}
			t := rec.Telemetry
			r.telemetry[hub] = append(r.telemetry[hub], hubtest.Telemetry{DeviceID: t.DeviceID, Payload: t.Payload,
				Properties: orEmpty(t.Properties), System: orEmpty(t.System), QoS: t.QoS, Received: t.Received})
		}
	}
	return r, nil
}

// orEmpty is m, or an empty map for nil: the hub records messages without properties with
// empty maps.
func orEmpty(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

// write appends rec and makes it live. A failed write is cut off the file, and the store
// fails: this and every later write return the error.
func (s *store) write(rec stateRecord) error {
	line, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	line = append(line, '\n')
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	if _, err := s.f.Write(line); err != nil {
		s.f.Truncate(s.size)
		return s.fail(err)
	}
	s.size += int64(len(line))
	s.apply(&rec, line)
	if s.size > compactAbove && s.size > 2*s.liveSize {
		if err := s.compact(); err != nil {
			return s.fail(err)
		}
	}
	return nil
}

func (s *store) fail(err error) error {
	s.err = fmt.Errorf("cannot save the emulator's state in %s: %w", s.path, err)
	close(s.failed)
	return s.err
}

// failure returns why the store failed, nil while it works.
func (s *store) failure() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func (s *store) close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		return nil
	}
	err := s.f.Close()
	s.f = nil
	if s.err == nil {
		s.err = errors.New("the state file is closed")
		close(s.failed)
	}
	return err
}

func (s *store) saveLayout(l layoutRecord) error { return s.write(stateRecord{Layout: &l}) }

// SaveDevice, DeleteDevice and SaveTelemetry make it a hubtest.Journal.

func (s *store) SaveDevice(hub string, d hubtest.DeviceState) error {
	return s.write(stateRecord{Device: newDeviceRecord(hub, d)})
}

func (s *store) DeleteDevice(hub, id string) error {
	return s.write(stateRecord{DeviceDeleted: &deviceDeletedRecord{Hub: hub, ID: id}})
}

func (s *store) SaveTelemetry(hub string, t hubtest.Telemetry) error {
	return s.write(stateRecord{Telemetry: &telemetryRecord{Hub: hub, DeviceID: t.DeviceID, Payload: t.Payload,
		Properties: t.Properties, System: t.System, QoS: t.QoS, Received: t.Received}})
}

// SaveRegistration, DeleteRegistration and SaveAttempt make it a dpstest.Journal.

func (s *store) SaveRegistration(r dpstest.Registration) error {
	return s.write(stateRecord{Registration: &r})
}

func (s *store) DeleteRegistration(regID string) error {
	return s.write(stateRecord{RegistrationDeleted: regID})
}

func (s *store) SaveAttempt(a dpstest.Attempt) error { return s.write(stateRecord{Attempt: &a}) }
