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
	var doc enrollmentsDoc
	if err := readDoc(path, &doc, &doc.Version); err != nil {
		return nil, err
	}
	return &enrollments{path: path, ctx: context.Background(), list: doc.Enrollments}, nil
}

// readDoc decodes the JSON document at path into doc, refusing unknown fields and a version
// (the document's own field) other than configVersion. A missing file leaves doc empty.
func readDoc(path string, doc any, version *int) error {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(doc); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if *version != configVersion {
		return fmt.Errorf("%s: unsupported version %d", path, *version)
	}
	return nil
}

// writeDoc replaces the JSON document at path, 0600, whole or not at all.
func writeDoc(path string, doc any) error {
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(data, '\n'), 0o600)
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
	if err := writeDoc(e.path, enrollmentsDoc{Version: configVersion, Enrollments: list}); err != nil {
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
			SymmetricKey: req.SymmetricKey, EndorsementKey: req.EndorsementKey, DeviceID: req.DeviceID, Policy: policy})
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
