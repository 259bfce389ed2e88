// Package meridian holds what every part of the kit agrees on and no
// single package owns: how nodes and regions are named. Positions are
// ltx.Pos (package github.com/meridian-db/meridian/ltx, with its strict
// ParsePos); a node's role and its lease live in regiond.
package meridian

// NameRule says how node and region names are written. A node's name is
// also the name in its TLS certificate.
const NameRule = "1-63 lowercase letters, digits and '-', starting with a letter or digit"

// ValidName reports whether s is a valid node or region name (NameRule).
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
			return false
		}
	}
	return true
}
