package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/atomicfile"
	"github.com/unicity-iot/unicity/internal/certcodec"
)

// enrollmentsFile keeps the enrollments added with 'enroll', so that a restarted emulator
// still admits the devices enrolled on it; what the services know of the devices is in
// stateFile.
const enrollmentsFile = "enrollments.json"

type enrollmentsDoc struct {
	Version     int             `json:"version"`
	Enrollments []enrollRequest `json:"enrollments"`
}

// enrollments is the enrollments file, loaded.
type enrollments struct {
	path string
	// ctx is what custom allocation programs run under: serve's.
	ctx  context.Context
	mu   sync.Mutex
	list []enrollRequest
}

func loadEnrollments(path string) (*enrollments, error) {
	e := &enrollments{path: path, ctx: context.Background()}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return e, nil
	}
	if err != nil {
		return nil, err
	}
	var doc enrollmentsDoc
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if doc.Version != configVersion {
		return nil, fmt.Errorf("%s: unsupported version %d", path, doc.Version)
	}
	e.list = doc.Enrollments
	return e, nil
}

// applyAll enrolls every saved enrollment with dps.
func (e *enrollments) applyAll(dps *dpstest.Server, allocate dpstest.AllocateFunc) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, req := range e.list {
		if err := e.apply(dps, allocate, req); err != nil {
			return fmt.Errorf("%s: %w", e.path, err)
		}
	}
	return nil
}

// add enrolls req with dps and saves it, replacing a saved enrollment with the same ID.
func (e *enrollments) add(dps *dpstest.Server, allocate dpstest.AllocateFunc, req enrollRequest) error {
	if err := e.apply(dps, allocate, req); err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	list := make([]enrollRequest, 0, len(e.list)+1)
	for _, old := range e.list {
		if old.key() != req.key() {
			list = append(list, old)
		}
	}
	list = append(list, req)
	data, err := json.MarshalIndent(enrollmentsDoc{Version: configVersion, Enrollments: list}, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(e.path, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("cannot save the enrollment: %w", err)
	}
	e.list = list
	return nil
}

// key identifies an enrollment as DPS does: a group by its ID, an individual enrollment by
// its registration ID, case-insensitively.
func (r enrollRequest) key() string {
	if r.Group != "" {
		return "group/" + r.Group
	}
	return "individual/" + strings.ToLower(r.RegistrationID)
}

// apply enrolls req with dps; allocate chooses hubs unless the enrollment has a custom
// allocation hook of its own.
func (e *enrollments) apply(dps *dpstest.Server, allocate dpstest.AllocateFunc, req enrollRequest) error {
	var err error
	switch {
	case req.AllocationReply != nil && req.AllocationScript != "":
		return errors.New("give an allocation reply or an allocation script, not both")
	case req.AllocationReply != nil:
		if allocate, err = staticAllocation(req.AllocationReply); err != nil {
			return fmt.Errorf("allocation reply: %w", err)
		}
	case req.AllocationScript != "":
		if allocate, err = scriptAllocation(e.ctx, req.AllocationScript); err != nil {
			return fmt.Errorf("allocation script: %w", err)
		}
	}
	policy := dpstest.Policy{Disabled: req.Disabled, InitialTwin: req.InitialTwin, Allocate: allocate}
	if req.Group == "" {
		return dps.AddIndividual(dpstest.Individual{RegistrationID: req.RegistrationID, Thumbprint: req.Thumbprint,
			SymmetricKey: req.SymmetricKey, DeviceID: req.DeviceID, Policy: policy})
	}
	g := dpstest.Group{ID: req.Group, SymmetricKey: req.SymmetricKey, Policy: policy}
	if req.CAPEM != "" {
		certs, err := certcodec.ParseCertificates([]byte(req.CAPEM))
		if err != nil {
			return err
		}
		g.CA = certs[0]
	}
	return dps.AddGroup(g)
}
