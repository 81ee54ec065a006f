package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

// Custom allocation, as DPS calls an Azure Function (learn.microsoft.com/azure/iot-dps/
// concepts-custom-allocation): an enrollment's hook is given Azure's AllocationRequest and
// answers with its AllocationResponse, which picks the hub, can set the initial twin and
// returns a payload to the device in registrationState.payload. The hook is a static
// reply, or a program run for each registration with the request on stdin and the response
// on stdout, so that the code of a real allocation function can be tried against devices.

// allocationTimeout bounds a hook program.
const allocationTimeout = 10 * time.Second

// allocationRequest is Azure's AllocationRequest, with the fields that apply here.
type allocationRequest struct {
	IndividualEnrollment *struct {
		RegistrationID string `json:"registrationId"`
	} `json:"individualEnrollment,omitempty"`
	EnrollmentGroup *struct {
		EnrollmentGroupID string `json:"enrollmentGroupId"`
	} `json:"enrollmentGroup,omitempty"`
	DeviceRuntimeContext struct {
		RegistrationID        string          `json:"registrationId"`
		CurrentIoTHubHostName string          `json:"currentIotHubHostName,omitempty"`
		CurrentDeviceID       string          `json:"currentDeviceId,omitempty"`
		X509                  *struct{}       `json:"x509,omitempty"`
		SymmetricKey          *struct{}       `json:"symmetricKey,omitempty"`
		Payload               json.RawMessage `json:"payload,omitempty"`
	} `json:"deviceRuntimeContext"`
	LinkedHubs []string `json:"linkedHubs"`
}

// allocationResponse is Azure's AllocationResponse.
type allocationResponse struct {
	IoTHubHostName string          `json:"iotHubHostName"`
	InitialTwin    json.RawMessage `json:"initialTwin,omitempty"`
	Payload        json.RawMessage `json:"payload,omitempty"`
}

func newAllocationRequest(r dpstest.AllocationRequest) allocationRequest {
	var req allocationRequest
	if r.Individual {
		req.IndividualEnrollment = &struct {
			RegistrationID string `json:"registrationId"`
		}{r.EnrollmentID}
	} else {
		req.EnrollmentGroup = &struct {
			EnrollmentGroupID string `json:"enrollmentGroupId"`
		}{r.EnrollmentID}
	}
	ctx := &req.DeviceRuntimeContext
	ctx.RegistrationID, ctx.CurrentIoTHubHostName, ctx.CurrentDeviceID = r.RegistrationID, r.CurrentHub, r.CurrentDeviceID
	ctx.Payload = r.Payload
	if r.Attestation == "x509" {
		ctx.X509 = &struct{}{}
	} else {
		ctx.SymmetricKey = &struct{}{}
	}
	req.LinkedHubs = r.LinkedHubs
	if req.LinkedHubs == nil {
		req.LinkedHubs = []string{}
	}
	return req
}

// parseAllocationResponse decodes a hook's answer; the hub is required, as DPS requires it.
func parseAllocationResponse(data []byte) (dpstest.AllocationResult, error) {
	var res allocationResponse
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&res); err != nil {
		return dpstest.AllocationResult{}, fmt.Errorf("the reply is not an AllocationResponse: %w", err)
	}
	if res.IoTHubHostName == "" {
		return dpstest.AllocationResult{}, errors.New("the reply names no iotHubHostName")
	}
	return dpstest.AllocationResult{Hub: res.IoTHubHostName, Payload: res.Payload, InitialTwin: res.InitialTwin}, nil
}

// staticAllocation answers every registration with reply.
func staticAllocation(reply json.RawMessage) (dpstest.AllocateFunc, error) {
	res, err := parseAllocationResponse(reply)
	if err != nil {
		return nil, err
	}
	return func(dpstest.AllocationRequest) (dpstest.AllocationResult, error) { return res, nil }, nil
}

// scriptAllocation runs the program at path for each registration, under ctx (serve's).
func scriptAllocation(ctx context.Context, path string) (dpstest.AllocateFunc, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return nil, fmt.Errorf("%s is not an executable file", path)
	}
	return func(r dpstest.AllocationRequest) (dpstest.AllocationResult, error) {
		in, err := json.Marshal(newAllocationRequest(r))
		if err != nil {
			return dpstest.AllocationResult{}, err
		}
		ctx, cancel := context.WithTimeout(ctx, allocationTimeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, path)
		var out, stderr bytes.Buffer
		cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(in), &limitedWriter{w: &out, n: 1 << 20}, &limitedWriter{w: &stderr, n: 4 << 10}
		if err := cmd.Run(); err != nil {
			if msg := strings.TrimSpace(stderr.String()); msg != "" {
				err = fmt.Errorf("%w: %s", err, msg)
			}
			return dpstest.AllocationResult{}, fmt.Errorf("allocation script %s: %w", path, err)
		}
		return parseAllocationResponse(out.Bytes())
	}, nil
}

// limitedWriter keeps the first n bytes written and discards the rest.
type limitedWriter struct {
	w io.Writer
	n int
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if keep := min(len(p), l.n); keep > 0 {
		l.w.Write(p[:keep])
		l.n -= keep
	}
	return len(p), nil
}
