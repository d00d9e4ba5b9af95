// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title GRID: 1 kWh exported = 1 GRID = 10**18 units (ERC-20, 18 decimals).
/// @notice Only the anchor contract that deployed it can mint, and it mints only what an
///         anchored batch commits to (directly, or through a claim against its claim root).
contract GRID is ERC20 {
    address public immutable minter;

    error NotMinter(address sender);

    constructor(address minter_) ERC20("GRID", "GRID") {
        minter = minter_;
    }

    function mint(address to, uint256 amount) external {
        if (msg.sender != minter) revert NotMinter(msg.sender);
        _mint(to, amount);
    }
}
