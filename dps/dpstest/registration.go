package dpstest

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/unicity-iot/unicity/internal/uuid"
)

// Assignment tells a Registrar that a device has been assigned to a hub.
type Assignment struct {
	RegistrationID string
	DeviceID       string
	Hub            string
	// PreviousHub is the hub of the earlier assignment when the device moved, else "".
	PreviousHub string
	Substatus   string
	// InitialTwin is set when the hub should (re)initialise the device's twin: on a first
	// assignment and on reprovisioning with Reset. Nil otherwise: the twin stays, or moves
	// from PreviousHub.
	InitialTwin json.RawMessage
	Auth        DeviceAuth
}

// DeviceAuth is how the hub should authenticate the device.
type DeviceAuth struct {
	// Thumbprint is the SHA-256 thumbprint (upper-case hex) of the certificate the device
	// presented. Empty for SAS devices.
	Thumbprint string
	// CA is set for CA-signed devices (group enrollments): any certificate chaining to it
	// with CN = device ID is the device.
	CA *x509.Certificate
	// SymmetricKey is the device key of a SAS device.
	SymmetricKey []byte
	// Issued, set alone, is the certificate DPS issued from the device's CSR: the hub
	// accepts it, besides the earlier ones it issued that are still valid, and no longer the
	// onboarding credential.
	Issued *x509.Certificate
}

// Registrar is told of each assignment before the device hears of it, so that the device
// can connect to its hub at once. An error fails the registration (errorCode 400209).
type Registrar interface {
	Assign(Assignment) error
}

// RegistrarFunc adapts a function to Registrar.
type RegistrarFunc func(Assignment) error

// Assign calls f.
func (f RegistrarFunc) Assign(a Assignment) error { return f(a) }

// Registration is the service's record of a device's latest completed registration.
type Registration struct {
	RegistrationID string    `json:"registration_id"`
	EnrollmentID   string    `json:"enrollment_id"`
	DeviceID       string    `json:"device_id"`
	Hub            string    `json:"hub,omitempty"`
	Status         string    `json:"status"` // assigned or failed
	Substatus      string    `json:"substatus,omitempty"`
	ErrorCode      int       `json:"error_code,omitempty"`
	Created        time.Time `json:"created"`
	Updated        time.Time `json:"updated"`
	// Hubs is every hub the device has been assigned to, first one first.
	Hubs []string `json:"hubs,omitempty"`
}

type record struct {
	Registration
	etag string
}

// Registration returns the record for a registration ID.
func (s *Server) Registration(regID string) (Registration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.records[strings.ToLower(regID)]
	if !ok {
		return Registration{}, false
	}
	out := r.Registration
	out.Hubs = slices.Clone(r.Hubs)
	return out, true
}

// DeleteRegistration forgets a device's registration, so its next one is an initial
// assignment.
func (s *Server) DeleteRegistration(regID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.records[strings.ToLower(regID)]; !ok {
		return fmt.Errorf("registration %q: %w", regID, ErrNotFound)
	}
	delete(s.records, strings.ToLower(regID))
	if s.cfg.Journal != nil {
		return s.cfg.Journal.DeleteRegistration(regID)
	}
	return nil
}

// operation is one register request and what became of it.
type operation struct {
	id      string
	regID   string
	enroll  *enrollment
	payload json.RawMessage
	csr     *x509.CertificateRequest // set when the enrollment has a credential policy
	// apiVersion is the device's, which decides whether the answer has a connectionProfile.
	apiVersion string
	readyAt    time.Time
	attempt    uint64 // Seq of the register request that started it

	once   sync.Once
	status int // of the response: 200
	body   []byte
	err    error // the Journal failed: the answer must not go out
}

// registrationState is DeviceRegistrationResult (protocol.md §3.2), fields in the order the
// service sends them.
type registrationState struct {
	X509                   *struct{}       `json:"x509,omitempty"`
	SymmetricKey           *symmetricKey   `json:"symmetricKey,omitempty"`
	RegistrationID         string          `json:"registrationId"`
	CreatedDateTimeUTC     string          `json:"createdDateTimeUtc,omitempty"`
	AssignedHub            string          `json:"assignedHub,omitempty"`
	DeviceID               string          `json:"deviceId,omitempty"`
	Status                 string          `json:"status"`
	Substatus              string          `json:"substatus,omitempty"`
	ErrorCode              int             `json:"errorCode,omitempty"`
	ErrorMessage           string          `json:"errorMessage,omitempty"`
	LastUpdatedDateTimeUTC string          `json:"lastUpdatedDateTimeUtc,omitempty"`
	ETag                   string          `json:"etag,omitempty"`
	Payload                json.RawMessage `json:"payload,omitempty"`
	IssuedCertificateChain []string        `json:"issuedCertificateChain,omitempty"`
	ConnectionProfile      string          `json:"connectionProfile,omitempty"`
}

type symmetricKey struct {
	EnrollmentGroupID string `json:"enrollmentGroupId,omitempty"`
}

type operationStatus struct {
	OperationID       string             `json:"operationId"`
	Status            string             `json:"status"`
	RegistrationState *registrationState `json:"registrationState,omitempty"`
}

// dpsTime formats like the service: UTC with 7 fractional digits.
func dpsTime(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.0000000Z") }

func newETag() string { return base64.StdEncoding.EncodeToString([]byte(`"` + uuid.New() + `"`)) }

// failure is an operation-level failure: a 200 response with status "failed".
type failure struct {
	code int
	msg  string
}

func (f *failure) Error() string { return f.msg }

// complete ends the operation once: allocates a hub, issues a certificate if asked, tells
// the Registrar and records the outcome. An error is the Journal's.
func (s *Server) complete(op *operation) (int, []byte, error) {
	op.once.Do(func() {
		op.status = 200
		if s.disabled(op) {
			// Disabled while the operation ran: answered as a disabled register is.
			op.body = disabledBody(op.id, op.regID)
			op.err = s.noteCompleted(op, &registrationState{RegistrationID: op.regID, Status: OutcomeDisabled})
			return
		}
		st := &registrationState{RegistrationID: op.regID}
		if op.enroll.leaf != nil {
			st.X509 = &struct{}{}
		} else if !op.enroll.individual {
			st.SymmetricKey = &symmetricKey{EnrollmentGroupID: op.enroll.id}
		} else {
			st.SymmetricKey = &symmetricKey{}
		}
		rec, err := s.assign(op, st)
		st.CreatedDateTimeUTC = dpsTime(rec.Created)
		st.LastUpdatedDateTimeUTC = dpsTime(rec.Updated)
		st.ETag = rec.etag
		switch f := (*failure)(nil); {
		case errors.As(err, &f):
			st.Status, st.ErrorCode, st.ErrorMessage = OutcomeFailed, f.code, f.msg
		case err != nil:
			op.err = err
			return
		default:
			st.Status = OutcomeAssigned
			s.stats.assignments.Add(1)
		}
		op.body, _ = json.Marshal(operationStatus{OperationID: op.id, Status: st.Status, RegistrationState: st})
		op.err = s.noteCompleted(op, st)
	})
	return op.status, op.body, op.err
}

func (s *Server) disabled(op *operation) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, _ := s.lookupLocked(op.enroll, op.regID)
	return p != nil && p.Disabled
}

// disabledBody is the answer for a device whose enrollment is disabled (protocol.md §7.3).
func disabledBody(opID, regID string) []byte {
	body, _ := json.Marshal(operationStatus{OperationID: opID, Status: "disabled",
		RegistrationState: &registrationState{RegistrationID: regID, Status: "disabled"}})
	return body
}

// assign does the allocation and records the result; the error is a *failure, or the
// Journal's.
func (s *Server) assign(op *operation, st *registrationState) (record, error) {
	now := s.cfg.Now()
	key := strings.ToLower(op.regID)

	s.mu.Lock()
	policy, deviceID := s.lookupLocked(op.enroll, op.regID)
	var pol Policy
	if policy != nil {
		pol = *policy
		pol.Hubs = slices.Clone(pol.Hubs)
	}
	prev, hadPrev := s.records[key]
	var prevCopy record
	if hadPrev {
		prevCopy = *prev
		prevCopy.Hubs = slices.Clone(prev.Hubs)
	}
	linked := pol.Hubs
	if len(linked) == 0 {
		linked = slices.Clone(s.cfg.Hubs)
	}
	s.mu.Unlock()

	rec := record{Registration: Registration{RegistrationID: op.regID, EnrollmentID: op.enroll.id,
		DeviceID: deviceID, Created: now, Updated: now}, etag: newETag()}
	if hadPrev {
		rec.Created, rec.Hubs = prevCopy.Created, prevCopy.Hubs
	}
	save := func(err error) (record, error) {
		rec.Status = "assigned"
		if f := (*failure)(nil); errors.As(err, &f) {
			rec.Status, rec.ErrorCode, rec.Substatus, rec.Hub = "failed", f.code, "", ""
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		s.records[key] = &rec
		if s.cfg.Journal != nil {
			if jerr := s.cfg.Journal.SaveRegistration(rec.Registration); jerr != nil {
				return rec, jerr
			}
		}
		return rec, err
	}

	if policy == nil {
		return save(&failure{404201, "enrollment " + op.enroll.id + " was removed"})
	}
	if len(linked) == 0 {
		return save(&failure{400208, "no IoT hub is linked to enrollment " + op.enroll.id})
	}
	previousHub := ""
	if hadPrev && prevCopy.Status == "assigned" {
		previousHub = prevCopy.Hub
	}
	twin := pol.InitialTwin
	var hub string
	switch {
	case previousHub != "" && pol.Reprovision == Never:
		hub = previousHub
	case pol.Allocate != nil:
		req := AllocationRequest{RegistrationID: op.regID, EnrollmentID: op.enroll.id, Individual: op.enroll.individual,
			Attestation: "symmetricKey", DeviceID: deviceID, Payload: op.payload, LinkedHubs: slices.Clone(linked), CurrentHub: previousHub}
		if op.enroll.leaf != nil {
			req.Attestation = "x509"
		}
		if previousHub != "" {
			req.CurrentDeviceID = prevCopy.DeviceID
		}
		res, err := pol.Allocate(req)
		if err != nil {
			return save(&failure{400207, "Custom allocation failed with status code: 400: " + err.Error()})
		}
		if !slices.Contains(linked, res.Hub) {
			return save(&failure{400207, fmt.Sprintf("Custom allocation returned hub %q, which is not linked", res.Hub)})
		}
		hub = res.Hub
		if res.Payload != nil && string(res.Payload) != "null" {
			st.Payload = res.Payload
		}
		if res.InitialTwin != nil {
			twin = res.InitialTwin
		}
	default:
		hub = allocate(&pol, linked, op.regID)
	}

	a := Assignment{RegistrationID: op.regID, DeviceID: deviceID, Hub: hub, Substatus: InitialAssignment,
		InitialTwin: twin, Auth: op.enroll.auth}
	switch {
	case previousHub == "" || hub == previousHub:
		// A new device, or one that stays put: nothing moves. (Which substatus Azure reports
		// for the latter is unverified; initialAssignment is the likely one.)
		if previousHub != "" {
			a.InitialTwin = nil
		}
	case slices.Contains(rec.Hubs, hub):
		a.Substatus, a.PreviousHub = ReprovisionedToInitialAssignment, previousHub
		if pol.Reprovision == Migrate {
			a.InitialTwin = nil
		}
	case pol.Reprovision == Reset:
		a.Substatus, a.PreviousHub = DeviceDataReset, previousHub
	default:
		a.Substatus, a.PreviousHub, a.InitialTwin = DeviceDataMigrated, previousHub, nil
	}

	if op.csr != nil && pol.Credential != nil {
		chain, err := s.issue(pol.Credential, op.csr)
		if err != nil {
			return save(&failure{400210, "cannot issue certificate: " + err.Error()})
		}
		for _, c := range chain {
			st.IssuedCertificateChain = append(st.IssuedCertificateChain, base64.StdEncoding.EncodeToString(c.Raw))
		}
		a.Auth = DeviceAuth{Issued: chain[0]}
	}

	if s.cfg.Registrar != nil {
		if err := s.cfg.Registrar.Assign(a); err != nil {
			return save(&failure{400209, "cannot register the device with hub " + hub + ": " + err.Error()})
		}
	}
	rec.Hub, rec.Substatus = hub, a.Substatus
	if !slices.Contains(rec.Hubs, hub) {
		rec.Hubs = append(rec.Hubs, hub)
	}
	st.AssignedHub, st.DeviceID, st.Substatus = hub, deviceID, a.Substatus
	st.ConnectionProfile = s.connectionProfile(hub, op.apiVersion)
	return save(nil)
}
