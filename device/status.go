package device

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/unicity-iot/unicity/internal/atomicfile"
)

// Phase is where the agent is in its lifecycle.
type Phase string

const (
	PhaseStarting     Phase = "starting"
	PhaseWaitingLock  Phase = "waiting_for_lock"
	PhaseLoading      Phase = "loading_identity"
	PhaseWaitingTPM   Phase = "waiting_for_tpm"
	PhaseWaitingClock Phase = "waiting_for_clock"
	PhaseProvisioning Phase = "provisioning"
	PhaseParked       Phase = "parked"
	PhaseConnecting   Phase = "connecting"
	PhaseConnected    Phase = "connected"
	PhaseStopped      Phase = "stopped"
)

// StatusFileName is the live status in the runtime directory, for `unicity status`.
const StatusFileName = "status.json"

// Status is what the agent is doing, in words a technician can act on. It holds no secret:
// the status file is world-readable.
type Status struct {
	Phase Phase `json:"phase"`
	// Message is the one line shown in `systemctl status` (STATUS=) and `unicity status`.
	Message        string    `json:"message"`
	RegistrationID string    `json:"registration_id,omitempty"`
	AssignedHub    string    `json:"assigned_hub,omitempty"`
	DeviceID       string    `json:"device_id,omitempty"`
	LastError      string    `json:"last_error,omitempty"`
	LastErrorAt    time.Time `json:"last_error_at,omitzero"`
	// Credential is which credential the hub is reached with (see CredentialState).
	Credential CredentialState `json:"credential,omitempty"`
	// Renewal is where the renewal of the operational certificate stands; nil without one.
	Renewal *RenewalStatus `json:"renewal,omitempty"`
	// Onboarding is the onboarding certificate's trouble: expired, or a roll pending.
	Onboarding *OnboardingStatus `json:"onboarding,omitempty"`
	// StoreError says why the assignment in use is not stored (disk full, read-only): the
	// agent keeps it in memory for this boot and retries the write.
	StoreError string    `json:"store_error,omitempty"`
	NextRetry  time.Time `json:"next_retry,omitzero"`
	// Attempts counts the failed tries of the current phase.
	Attempts       int       `json:"attempts,omitempty"`
	Since          time.Time `json:"since"`
	ConnectedSince time.Time `json:"connected_since,omitzero"`
	PID            int       `json:"pid"`
	UpdatedAt      time.Time `json:"updated_at"`
	// Telemetry is the applications' messages on their way to the hub, as the running
	// agent's local API reports it (the status file has none).
	Telemetry *TelemetryStatus `json:"telemetry,omitempty"`
}

// TelemetryStatus is the on-disk telemetry queue ([telemetry] in the configuration) in
// `status`, GET /v1/status and the twin's health report.
type TelemetryStatus struct {
	// Messages is the queue's depth: stored and not yet acknowledged by the hub, InFlight of
	// them sent and waiting for their PUBACK.
	Messages int   `json:"messages"`
	InFlight int   `json:"in_flight"`
	Bytes    int64 `json:"bytes"`
	MaxBytes int64 `json:"max_bytes"`
	// OldestAgeSeconds is how long the oldest message has waited; 0 with an empty queue.
	OldestAgeSeconds int64  `json:"oldest_age_s"`
	WhenFull         string `json:"when_full"`
	// Dropped (to make room, when_full = "drop-oldest"), Expired (older than max_age) and
	// Rejected (refused by the hub for good) count messages removed unsent since the agent
	// started; Torn counts damaged records dropped when the queue was opened.
	Dropped  int64 `json:"dropped"`
	Expired  int64 `json:"expired"`
	Rejected int64 `json:"rejected"`
	Torn     int64 `json:"torn"`
	// Problem says why the queue is not open: the agent waits for a valid clock, or the
	// directory cannot be used. Applications are answered 503 meanwhile.
	Problem string `json:"problem,omitempty"`
}

// WriteStatus replaces the status file in dir. Readers see one whole status or the previous
// one.
func WriteStatus(dir string, s Status) error {
	data, err := json.Marshal(s)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("cannot create the runtime directory: %w", err)
	}
	return atomicfile.Write(filepath.Join(dir, StatusFileName), append(data, '\n'), 0o644)
}

// ReadStatus reads the status file the agent last wrote in dir. The agent may have stopped
// since: fs.ErrNotExist when there is none.
func ReadStatus(dir string) (*Status, error) {
	data, err := os.ReadFile(filepath.Join(dir, StatusFileName))
	if err != nil {
		return nil, err
	}
	var s Status
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, StatusFileName), err)
	}
	return &s, nil
}
