package attest

import (
	"crypto/x509"
	"errors"
	"fmt"
	"strconv"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// ErrNVExists means the NV index already holds data; an installed identity is replaced only
// deliberately (tpm2_nvundefine).
var ErrNVExists = errors.New("TPM NV index already defined")

// defaultNVBufferMax is the smallest NV I/O size TPMs commonly report, used when the TPM
// does not answer TPM2_PT_NV_BUFFER_MAX.
const defaultNVBufferMax = 512

// ParseNVIndex parses an NV index handle such as "0x01c0000a".
func ParseNVIndex(s string) (tpm2.TPMHandle, error) {
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil || v>>24 != 0x01 {
		return 0, fmt.Errorf("%w: NV index %q: want 0x01000000 to 0x01FFFFFF", ErrInvalidIdentity, s)
	}
	return tpm2.TPMHandle(v), nil
}

// ReadNV reads the whole contents of NV index idx, in chunks the TPM accepts.
func ReadNV(tpm transport.TPM, idx tpm2.TPMHandle) ([]byte, error) {
	rp, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("cannot read NV index %#x: %w", uint32(idx), err)
	}
	pub, err := rp.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("cannot read NV index %#x: %w", uint32(idx), err)
	}
	nh := tpm2.NamedHandle{Handle: idx, Name: rp.NVName}
	chunk := nvBufferMax(tpm)
	out := make([]byte, 0, pub.DataSize)
	for off := 0; off < int(pub.DataSize); off += chunk {
		n := min(chunk, int(pub.DataSize)-off)
		r, err := tpm2.NVRead{AuthHandle: nh, NVIndex: nh, Size: uint16(n), Offset: uint16(off)}.Execute(tpm)
		if err != nil {
			return nil, fmt.Errorf("cannot read NV index %#x at %d: %w", uint32(idx), off, err)
		}
		out = append(out, r.Data.Buffer...)
	}
	return out, nil
}

// WriteChainNV defines NV index idx (owner-authorised, readable without a password) and
// stores chain in it as DER certificates back to back. It refuses an index already defined.
func WriteChainNV(tpm transport.TPM, idx tpm2.TPMHandle, chain []*x509.Certificate) error {
	var der []byte
	for _, c := range chain {
		der = append(der, c.Raw...)
	}
	if _, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(tpm); err == nil {
		return fmt.Errorf("%w: %#x", ErrNVExists, uint32(idx))
	}
	def := tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: idx,
			NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{
				OwnerWrite: true, OwnerRead: true, AuthRead: true, AuthWrite: true,
				NoDA: true, NT: tpm2.TPMNTOrdinary,
			},
			DataSize: uint16(len(der)),
		}),
	}
	if _, err := def.Execute(tpm); err != nil {
		return fmt.Errorf("cannot define NV index %#x for %d bytes: %w", uint32(idx), len(der), err)
	}
	rp, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("cannot read NV index %#x: %w", uint32(idx), err)
	}
	nh := tpm2.NamedHandle{Handle: idx, Name: rp.NVName}
	chunk := nvBufferMax(tpm)
	for off := 0; off < len(der); off += chunk {
		end := min(off+chunk, len(der))
		_, err := tpm2.NVWrite{
			AuthHandle: tpm2.TPMRHOwner,
			NVIndex:    nh,
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: der[off:end]},
			Offset:     uint16(off),
		}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("cannot write NV index %#x at %d: %w", uint32(idx), off, err)
		}
	}
	return nil
}

func nvBufferMax(tpm transport.TPM) int {
	r, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapTPMProperties,
		Property:      uint32(tpm2.TPMPTNVBufferMax),
		PropertyCount: 1,
	}.Execute(tpm)
	if err != nil {
		return defaultNVBufferMax
	}
	props, err := r.CapabilityData.Data.TPMProperties()
	if err != nil || len(props.TPMProperty) == 0 || props.TPMProperty[0].Property != tpm2.TPMPTNVBufferMax || props.TPMProperty[0].Value == 0 {
		return defaultNVBufferMax
	}
	return int(props.TPMProperty[0].Value)
}
