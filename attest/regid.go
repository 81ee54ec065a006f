package attest

import "fmt"

// maxRegistrationIDLen is DPS's limit for X.509 attestation, where the registration ID is the
// certificate's CN and X.509 caps a CN at 64 characters (DPS itself allows 128).
const maxRegistrationIDLen = 64

// ValidRegistrationID checks id against DPS's rules: 1 to 64 characters, alphanumerics and
// "-", ".", "_", ":", ending in an alphanumeric or "-". DPS compares IDs case-insensitively,
// so two IDs differing only in case name the same device.
func ValidRegistrationID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("%w: empty", ErrBadRegistrationID)
	case len(id) > maxRegistrationIDLen:
		return fmt.Errorf("%w: %q is %d characters, at most %d are allowed", ErrBadRegistrationID, id, len(id), maxRegistrationIDLen)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !isAlnum(c) && c != '-' && c != '.' && c != '_' && c != ':' {
			return fmt.Errorf("%w: %q contains %q: only letters, digits and - . _ : are allowed", ErrBadRegistrationID, id, rune(c))
		}
	}
	if last := id[len(id)-1]; !isAlnum(last) && last != '-' {
		return fmt.Errorf("%w: %q ends in %q: the last character must be a letter, digit or -", ErrBadRegistrationID, id, rune(last))
	}
	return nil
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}
